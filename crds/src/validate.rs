//! Rules across fields that an OpenAPI schema cannot state. The operator's admission webhook
//! runs them on every create and update; each error names the field and what is allowed.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::common::{ArtifactRef, Conv2dSpec, DType};
use crate::kernel_deployment::{ACTION_ANNOTATION, KernelDeploymentSpec, KernelSpec, ManualAction};
use crate::training_job::{AsyncTrainingJobSpec, PipelineMode};

/// One violated rule: the field's path (as `kubectl explain` spells it) and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Joins errors into the one message an API client shows.
pub fn describe(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Values one tensor of one sample (an input, an output, a kernel's weights) may hold: 2^24
/// f32s, 64 MiB. Agents allocate several at once for shadow load, traffic and training; far
/// larger ones would exhaust a node's memory, or overflow its arithmetic.
pub const MAX_TENSOR_VALUES: u64 = 1 << 24;

/// Values a training step's activations of one layer may hold over the batch: 1 GiB of f32s.
pub const MAX_BATCH_VALUES: u64 = 1 << 28;

/// Values all of a training step's activations may hold over the batch, which it keeps from
/// the forward pass to the backward: 4 GiB of f32s.
pub const MAX_STEP_VALUES: u64 = 1 << 30;

/// Values of one sample's lowered input to one layer (`in/groups * kh * kw` by `oh * ow`),
/// which a backward pass holds twice on each thread: 256 MiB of f32s.
pub const MAX_LOWERED_VALUES: u64 = 1 << 26;

/// The product of `dims`, saturating.
fn values(dims: &[u32]) -> u64 {
    dims.iter()
        .fold(1u64, |n, &d| n.saturating_mul(u64::from(d)))
}

struct Errors {
    list: Vec<FieldError>,
    /// Whether sizes are held to the bounds above.
    sizes: bool,
}

impl Default for Errors {
    fn default() -> Self {
        Self {
            list: Vec::new(),
            sizes: true,
        }
    }
}

impl Errors {
    fn stored() -> Self {
        Self {
            sizes: false,
            ..Self::default()
        }
    }

    /// Pushes a size bound's error, where sizes are checked.
    fn size(&mut self, field: impl Into<String>, message: String) {
        if self.sizes {
            self.push(field, message);
        }
    }

    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.list.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Refuses a tensor of `dims` larger than [`MAX_TENSOR_VALUES`]; returns its size.
    fn tensor(&mut self, field: impl Into<String>, what: &str, dims: &[u32]) -> u64 {
        let n = values(dims);
        if n > MAX_TENSOR_VALUES {
            self.size(
                field,
                format!("{what} would hold {n} values ({dims:?}); at most {MAX_TENSOR_VALUES}"),
            );
        }
        n
    }
}

/// Checks a KernelDeployment's spec, as admission and the operator do: an object the
/// webhook did not see (it was down, or not installed) is refused by the operator.
pub fn kernel_deployment(spec: &KernelDeploymentSpec) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    artifact(&mut e, "spec.kernel.artifact", &spec.kernel.artifact);
    op(&mut e, &spec.kernel);
    label_selector(&mut e, "spec.nodeSelector", &spec.node_selector);

    let steps = &spec.rollout.steps;
    if steps.is_empty() {
        e.push(
            "spec.rollout.steps",
            "must have at least one step, the last at trafficPercent 100",
        );
    }
    for (i, pair) in steps.windows(2).enumerate() {
        if pair[1].traffic_percent <= pair[0].traffic_percent {
            e.push(
                format!("spec.rollout.steps[{}].trafficPercent", i + 1),
                format!(
                    "must be greater than the previous step's {} (steps strictly increase)",
                    pair[0].traffic_percent
                ),
            );
        }
    }
    if let Some(last) = steps.last().filter(|s| s.traffic_percent != 100) {
        e.push(
            format!("spec.rollout.steps[{}].trafficPercent", steps.len() - 1),
            format!("the last step must be 100, not {}", last.traffic_percent),
        );
    }
    for (i, step) in steps.iter().enumerate() {
        if step.pause.is_some_and(|p| p.is_negative()) {
            e.push(
                format!("spec.rollout.steps[{i}].pause"),
                "must not be negative",
            );
        }
    }
    let deadline = spec.rollout.progress_deadline;
    if deadline.is_negative() || std::time::Duration::from(deadline).is_zero() {
        e.push(
            "spec.rollout.progressDeadline",
            "must be a positive duration such as 10m",
        );
    }
    let a = &spec.rollout.analysis;
    if a.interval.is_negative() || std::time::Duration::from(a.interval).is_zero() {
        e.push(
            "spec.rollout.analysis.interval",
            "must be a positive duration such as 30s",
        );
    }
    if !(0.0..=1.0).contains(&a.min_success_rate) {
        e.push(
            "spec.rollout.analysis.minSuccessRate",
            "must be a fraction between 0 and 1",
        );
    }
    if !a.max_overhead_ratio.is_finite() || a.max_overhead_ratio <= 0.0 {
        e.push(
            "spec.rollout.analysis.maxOverheadRatio",
            "must be a positive number, such as 1.1",
        );
    }
    if !a.max_numeric_diff.is_finite() || a.max_numeric_diff < 0.0 {
        e.push(
            "spec.rollout.analysis.maxNumericDiff",
            "must be a finite number of at least 0",
        );
    }
    // The schema's minima, again for objects older than them.
    if a.min_samples == 0 {
        e.push("spec.rollout.analysis.minSamples", "must be at least 1");
    }
    if a.failure_limit == 0 {
        e.push("spec.rollout.analysis.failureLimit", "must be at least 1");
    }
    finish(e)
}

/// Checks a change to a KernelDeployment: the op's shape is fixed for its life, because
/// canary and stable must take the same inputs.
pub fn kernel_deployment_update(
    old: &KernelDeploymentSpec,
    new: &KernelDeploymentSpec,
) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    if old.kernel.conv2d != new.kernel.conv2d {
        e.push(
            "spec.kernel.conv2d",
            "is immutable: canary and stable revisions must implement the same conv2d; create a new KernelDeployment for a different op",
        );
    }
    finish(e)
}

/// Checks the manual-action annotation, if present.
pub fn action_annotation(
    annotations: &std::collections::BTreeMap<String, String>,
) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    if let Some(value) = annotations.get(ACTION_ANNOTATION)
        && let Err(message) = ManualAction::parse(value)
    {
        e.push(
            format!("metadata.annotations[{ACTION_ANNOTATION}]"),
            message,
        );
    }
    finish(e)
}

/// Checks a KernelDeployment's op, `spec.kernel.conv2d` over `spec.kernel.inputSize`: what
/// agents check before they warm or serve one, since no node could hold the tensors of one
/// that fails (the op cannot change, so it never passed admission).
pub fn kernel_op(kernel: &KernelSpec) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    op(&mut e, kernel);
    finish(e)
}

fn op(e: &mut Errors, kernel: &KernelSpec) {
    let (conv, input) = (&kernel.conv2d, kernel.input_size);
    if input.contains(&0) {
        e.push(
            "spec.kernel.inputSize",
            "height and width must both be at least 1",
        );
    }
    if conv2d(e, "spec.kernel.conv2d", conv) && !input.contains(&0) {
        let dims = [conv.in_channels, input[0], input[1]];
        e.tensor("spec.kernel.inputSize", "one sample's input", &dims);
        check_output(e, "spec.kernel", conv, input);
    }
}

/// Checks an AsyncTrainingJob's spec, as admission does. The shapes of layers from
/// KernelDeployments, and of data from an artifact, are known only where the job runs: its
/// agent checks the whole [`model`] then.
pub fn training_job(spec: &AsyncTrainingJobSpec) -> Result<(), Vec<FieldError>> {
    training_job_with(spec, Errors::default())
}

/// [`training_job`] without the size bounds, as the operator checks a stored job: one
/// admitted before a bound, whose spec cannot change, would otherwise hold for good; its
/// agent fails it instead, with the bound it breaks, when it runs.
pub fn stored_training_job(spec: &AsyncTrainingJobSpec) -> Result<(), Vec<FieldError>> {
    training_job_with(spec, Errors::stored())
}

fn training_job_with(spec: &AsyncTrainingJobSpec, mut e: Errors) -> Result<(), Vec<FieldError>> {
    let (samples, shape) = match (&spec.data.synthetic, &spec.data.artifact) {
        (Some(s), None) => {
            if s.shape.contains(&0) {
                e.push(
                    "spec.data.synthetic.shape",
                    "channels, height and width must all be at least 1",
                );
            }
            e.tensor("spec.data.synthetic.shape", "one sample", &s.shape);
            (Some(s.samples), Some(s.shape))
        }
        (None, Some(a)) => {
            artifact(&mut e, "spec.data.artifact", a);
            (None, None)
        }
        _ => {
            e.push("spec.data", "set exactly one of synthetic or artifact");
            (None, None)
        }
    };

    let mut chain = Chain::new(shape);
    let mut names = std::collections::HashSet::new();
    for (i, layer) in spec.model.layers.iter().enumerate() {
        let at = format!("spec.model.layers[{i}]");
        if !names.insert(layer.name.as_str()) {
            e.push(
                format!("{at}.name"),
                format!(
                    "duplicate layer name {:?}; names must be unique",
                    layer.name
                ),
            );
        }
        match (&layer.kernel_deployment_ref, &layer.conv2d) {
            (Some(_), None) => chain.shape = None,
            (None, Some(conv)) => chain.layer(&mut e, &at, conv),
            _ => e.push(at, "set exactly one of kernelDeploymentRef or conv2d"),
        }
    }
    if spec
        .model
        .layers
        .iter()
        .all(|l| l.kernel_deployment_ref.is_some())
    {
        e.push(
            "spec.model.layers",
            "needs at least one inline conv2d layer: layers from KernelDeployments are frozen, so there would be nothing to train",
        );
    }

    let t = &spec.training;
    if !t.learning_rate.is_finite() || t.learning_rate <= 0.0 {
        e.push("spec.training.learningRate", "must be a positive number");
    }
    if !(0.0..1.0).contains(&t.momentum) {
        e.push("spec.training.momentum", "must be at least 0 and below 1");
    }
    chain.batch(&mut e, t.batch_size);
    if let Some(samples) = samples.filter(|&n| n < u64::from(t.batch_size)) {
        e.push(
            "spec.training.batchSize",
            format!("must not exceed the {samples} samples of spec.data.synthetic.samples"),
        );
    }
    let p = &spec.pipeline;
    let needed = match p.mode {
        PipelineMode::Sequential => 1,
        PipelineMode::Double => 1,
        PipelineMode::Triple => 2,
    };
    if p.prefetch_depth < needed {
        e.push(
            "spec.pipeline.prefetchDepth",
            format!("must be at least {needed} for {:?} buffering", p.mode).to_lowercase(),
        );
    }
    label_selector(
        &mut e,
        "spec.placement.nodeSelector",
        &spec.placement.node_selector,
    );
    if spec.run_policy.active_deadline_seconds == Some(0) {
        e.push(
            "spec.runPolicy.activeDeadlineSeconds",
            "must be at least 1 when set",
        );
    }
    finish(e)
}

/// Checks an update of an AsyncTrainingJob: only `spec.runPolicy` may change, because the
/// workers' checkpoints, data order and placement follow from the rest.
pub fn training_job_update(
    old: &AsyncTrainingJobSpec,
    new: &AsyncTrainingJobSpec,
) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    let message = "cannot change once the job exists (its checkpoints and data order follow from it); only spec.runPolicy may change";
    let fields = [
        ("spec.model", old.model == new.model),
        ("spec.data", old.data == new.data),
        ("spec.training", old.training == new.training),
        ("spec.pipeline", old.pipeline == new.pipeline),
        ("spec.placement", old.placement == new.placement),
        ("spec.checkpoint", old.checkpoint == new.checkpoint),
    ];
    for (field, same) in fields {
        if !same {
            e.push(field, message);
        }
    }
    finish(e)
}

/// Checks a model whose every layer's conv2d is known, over samples of `input` (channels,
/// height, width) in batches of `batch`: what an agent checks once it has resolved the
/// layers from KernelDeployments and read the data, before it allocates for them.
pub fn model(layers: &[Conv2dSpec], input: [u32; 3], batch: u32) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    e.tensor("spec.data", "one sample", &input);
    let mut chain = Chain::new(Some(input));
    for (i, conv) in layers.iter().enumerate() {
        chain.layer(&mut e, &format!("spec.model.layers[{i}]"), conv);
    }
    chain.batch(&mut e, batch);
    finish(e)
}

/// A model's shapes as they chain from its input, and the sizes a training step holds.
struct Chain {
    /// One sample's shape coming into the next layer, while known.
    shape: Option<[u32; 3]>,
    /// The largest of one sample's activations known, and all of them summed.
    largest: u64,
    total: u64,
}

impl Chain {
    fn new(input: Option<[u32; 3]>) -> Self {
        let n = input.map_or(0, |s| values(&s));
        Self {
            shape: input,
            largest: n,
            total: n,
        }
    }

    /// Chains the layer at `at`, with `conv` for its op.
    fn layer(&mut self, e: &mut Errors, at: &str, conv: &Conv2dSpec) {
        let field = format!("{at}.conv2d");
        if !conv2d(e, &field, conv) {
            self.shape = None;
            return;
        }
        let Some([c, h, w]) = self.shape else { return };
        if c != conv.in_channels {
            e.push(
                format!("{field}.inChannels"),
                format!(
                    "is {} but {c} channels come into this layer; they must be equal",
                    conv.in_channels
                ),
            );
        }
        self.shape = check_output(e, at, conv, [h, w]).map(|[h, w]| [conv.out_channels, h, w]);
        let Some([k, oh, ow]) = self.shape else {
            return;
        };
        let n = values(&[k, oh, ow]);
        self.largest = self.largest.max(n);
        self.total = self.total.saturating_add(n);
        let [kh, kw] = conv.kernel_size;
        let lowered = values(&[conv.in_channels / conv.groups, kh, kw, oh, ow]);
        if lowered > MAX_LOWERED_VALUES {
            e.size(
                field,
                format!("training would lower one sample's input to this layer into {lowered} values; at most {MAX_LOWERED_VALUES}"),
            );
        }
    }

    /// Bounds the activations of a batch of `batch` samples.
    fn batch(&self, e: &mut Errors, batch: u32) {
        let b = u64::from(batch);
        let largest = self.largest.saturating_mul(b);
        if largest > MAX_BATCH_VALUES {
            e.size(
                "spec.training.batchSize",
                format!("a batch of {batch} would hold {largest} values in one layer's activations; at most {MAX_BATCH_VALUES}"),
            );
        }
        let total = self.total.saturating_mul(b);
        if total > MAX_STEP_VALUES {
            e.size(
                "spec.training.batchSize",
                format!("a batch of {batch} would hold {total} values in all its activations, which a training step keeps from its forward pass to its backward; at most {MAX_STEP_VALUES}"),
            );
        }
    }
}

fn finish(e: Errors) -> Result<(), Vec<FieldError>> {
    if e.list.is_empty() {
        Ok(())
    } else {
        Err(e.list)
    }
}

fn artifact(e: &mut Errors, at: &str, a: &ArtifactRef) {
    let allowed = "allowed are file:///absolute/path, http(s)://host/path and s3://bucket/key";
    match a.url.split_once("://") {
        Some(("file", path)) if path.starts_with('/') => {}
        Some(("file", _)) => e.push(
            format!("{at}.url"),
            format!("a file URL needs an absolute path; {allowed}"),
        ),
        Some(("http" | "https" | "s3", rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            // The path (an object's key) starts with `/` and names something.
            let path = rest[host.len()..]
                .split(['?', '#'])
                .next()
                .unwrap_or_default();
            if host.is_empty() || !path.starts_with('/') || path.len() < 2 {
                e.push(
                    format!("{at}.url"),
                    format!("needs a host (or bucket) and a path; {allowed}"),
                );
            }
        }
        _ => e.push(
            format!("{at}.url"),
            format!("unsupported scheme in {:?}; {allowed}", a.url),
        ),
    }
    if !is_sha256(&a.sha256) {
        e.push(format!("{at}.sha256"), "must be 64 lowercase hex digits");
    }
}

/// Whether `s` spells a sha256 digest as the API does: 64 lowercase hex digits.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks one conv2d on its own, naming fields under `at` (what `kernelflow-pack` packs).
pub fn conv2d_alone(at: &str, c: &Conv2dSpec) -> Result<(), Vec<FieldError>> {
    let mut e = Errors::default();
    conv2d(&mut e, at, c);
    finish(e)
}

/// Checks one conv2d's own parameters; true when they are sound enough to compute shapes.
fn conv2d(e: &mut Errors, at: &str, c: &Conv2dSpec) -> bool {
    let before = e.list.len();
    // The schema's minimum, again for conv2ds that reach here without it.
    for (name, channels) in [
        ("inChannels", c.in_channels),
        ("outChannels", c.out_channels),
    ] {
        if channels == 0 {
            e.push(format!("{at}.{name}"), "must be at least 1");
        }
    }
    for (name, pair) in [
        ("kernelSize", c.kernel_size),
        ("stride", c.stride),
        ("dilation", c.dilation),
    ] {
        if pair.contains(&0) {
            e.push(format!("{at}.{name}"), "both values must be at least 1");
        }
    }
    if c.dtype != DType::F32 {
        e.push(
            format!("{at}.dtype"),
            "must be f32: agents run no other element type yet",
        );
    }
    if c.groups == 0 {
        e.push(format!("{at}.groups"), "must be at least 1");
    } else {
        for (name, channels) in [
            ("inChannels", c.in_channels),
            ("outChannels", c.out_channels),
        ] {
            if channels % c.groups != 0 {
                e.push(
                    format!("{at}.groups"),
                    format!("{} groups do not divide {name} {channels}; groups must divide both channel counts", c.groups),
                );
            }
        }
        let [kh, kw] = c.kernel_size;
        e.tensor(
            at,
            "the weights",
            &[c.out_channels, c.in_channels / c.groups, kh, kw],
        );
    }
    e.list.len() == before
}

fn check_output(e: &mut Errors, at: &str, c: &Conv2dSpec, input: [u32; 2]) -> Option<[u32; 2]> {
    let out = c.output_size(input);
    if let Some([h, w]) = out {
        let dims = [c.out_channels, h, w];
        e.tensor(format!("{at}.conv2d"), "one sample's output", &dims);
    } else {
        e.push(
            format!("{at}.conv2d"),
            format!(
                "kernel {:?} with dilation {:?} does not fit the {}x{} input padded by {:?}; the output would be empty",
                c.kernel_size, c.dilation, input[0], input[1], c.padding
            ),
        );
    }
    out
}

fn label_selector(e: &mut Errors, at: &str, s: &LabelSelector) {
    for (i, r) in s.match_expressions.iter().flatten().enumerate() {
        let at = format!("{at}.matchExpressions[{i}]");
        let values = r.values.as_ref().map_or(0, Vec::len);
        match r.operator.as_str() {
            "In" | "NotIn" if values == 0 => e.push(
                format!("{at}.values"),
                format!("must not be empty for operator {}", r.operator),
            ),
            "Exists" | "DoesNotExist" if values > 0 => e.push(
                format!("{at}.values"),
                format!("must be empty for operator {}", r.operator),
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => e.push(
                format!("{at}.operator"),
                format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AsyncTrainingJobSpec, KernelDeploymentSpec};

    fn kd(yaml: &str) -> KernelDeploymentSpec {
        let base = r#"
kernel:
  artifact: {url: "https://store.example/k.safetensors", sha256: "0000000000000000000000000000000000000000000000000000000000000000"}
  conv2d: {inChannels: 4, outChannels: 8, kernelSize: [3, 3], padding: [1, 1]}
nodeSelector: {matchLabels: {gpu: "true"}}
"#;
        let mut v: serde_json::Value = serde_yaml::from_str(base).unwrap();
        crate::apply_merge_patch(&mut v, serde_yaml::from_str(yaml).unwrap());
        serde_json::from_value(v).unwrap()
    }

    fn atj(yaml: &str) -> AsyncTrainingJobSpec {
        let base = r#"
model: {layers: [{name: a, conv2d: {inChannels: 3, outChannels: 8, kernelSize: [3, 3], padding: [1, 1]}},
                 {name: b, conv2d: {inChannels: 8, outChannels: 3, kernelSize: [3, 3], padding: [1, 1]}}]}
data: {synthetic: {shape: [3, 16, 16], samples: 64}}
training: {batchSize: 8, steps: 10, learningRate: 0.01, momentum: 0.9}
placement: {nodeSelector: {matchLabels: {gpu: "true"}}}
"#;
        let mut v: serde_json::Value = serde_yaml::from_str(base).unwrap();
        crate::apply_merge_patch(&mut v, serde_yaml::from_str(yaml).unwrap());
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_op_is_immutable_but_artifact_and_flags_may_change() {
        let old = kd("{}");
        let new_weights = kd(
            r#"{kernel: {artifact: {sha256: "1111111111111111111111111111111111111111111111111111111111111111"}}, flags: {asyncEnabled: true}}"#,
        );
        assert_eq!(kernel_deployment_update(&old, &new_weights), Ok(()));
        let reshaped = kd("{kernel: {conv2d: {outChannels: 16}}}");
        let errors = kernel_deployment_update(&old, &reshaped).unwrap_err();
        assert_eq!(errors[0].field, "spec.kernel.conv2d");
        assert!(errors[0].message.contains("immutable"), "{errors:?}");
    }

    #[test]
    fn action_annotations_name_a_known_verb() {
        let with = |v: &str| [(ACTION_ANNOTATION.to_string(), v.to_string())].into();
        for ok in ["promote", "promote-full:17", "abort:x", "retry"] {
            assert_eq!(action_annotation(&with(ok)), Ok(()), "{ok}");
        }
        let errors = action_annotation(&with("promot:1")).unwrap_err();
        assert_eq!(
            errors[0].field,
            "metadata.annotations[kernelflow.dev/action]"
        );
        assert!(errors[0].message.contains("\"promot\""), "{errors:?}");
        assert_eq!(action_annotation(&Default::default()), Ok(()));
        assert_eq!(
            ManualAction::parse("promote-full:9"),
            Ok(ManualAction::PromoteFull)
        );
    }

    fn fields(r: Result<(), Vec<FieldError>>) -> Vec<String> {
        r.err()
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn valid_specs_pass() {
        assert_eq!(kernel_deployment(&kd("{}")), Ok(()));
        assert_eq!(atj_ok("{}"), Ok(()));
    }

    fn atj_ok(yaml: &str) -> Result<(), Vec<FieldError>> {
        training_job(&atj(yaml))
    }

    #[test]
    fn steps_must_increase_and_end_at_100() {
        let r = kernel_deployment(&kd(
            "rollout: {steps: [{trafficPercent: 10}, {trafficPercent: 10}, {trafficPercent: 50}]}",
        ));
        assert_eq!(
            fields(r),
            [
                "spec.rollout.steps[1].trafficPercent",
                "spec.rollout.steps[2].trafficPercent"
            ]
        );
        let r = kernel_deployment(&kd("rollout: {steps: []}"));
        assert_eq!(fields(r), ["spec.rollout.steps"]);
    }

    #[test]
    fn groups_must_divide_channels() {
        let r = kernel_deployment(&kd("kernel: {conv2d: {groups: 3}}"));
        let errs = r.unwrap_err();
        assert_eq!(errs.len(), 2);
        assert!(
            errs[0]
                .to_string()
                .contains("3 groups do not divide inChannels 4"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn element_types_agents_cannot_run_are_refused() {
        for dtype in ["f16", "bf16"] {
            let r = kernel_deployment(&kd(&format!("kernel: {{conv2d: {{dtype: {dtype}}}}}")));
            assert_eq!(fields(r), ["spec.kernel.conv2d.dtype"]);
        }
        assert_eq!(
            kernel_deployment(&kd("kernel: {conv2d: {dtype: f32}}")),
            Ok(())
        );
    }

    #[test]
    fn tensors_a_node_could_not_hold_are_refused() {
        // 64 x 4096 x 4096 inputs and outputs: each 2^30 values.
        let r = kernel_deployment(&kd(
            "kernel: {inputSize: [4096, 4096], conv2d: {inChannels: 64, outChannels: 64}}",
        ));
        assert_eq!(fields(r), ["spec.kernel.inputSize", "spec.kernel.conv2d"]);
        // Padding alone makes the output that large.
        let r = kernel_deployment(&kd("kernel: {conv2d: {padding: [60000, 60000]}}"));
        assert_eq!(fields(r), ["spec.kernel.conv2d"]);
        // 2^64 weights: saturates instead of overflowing.
        let r = kernel_deployment(&kd(
            "kernel: {conv2d: {inChannels: 65536, outChannels: 65536, kernelSize: [65536, 65536], padding: [65536, 65536]}}",
        ));
        let errors = r.unwrap_err();
        assert_eq!(errors[0].field, "spec.kernel.conv2d");
        assert!(
            errors[0].message.contains(&u64::MAX.to_string()),
            "{errors:?}"
        );
        let r = training_job(&atj("data: {synthetic: {shape: [3, 65536, 65536]}}"));
        assert!(fields(r).contains(&"spec.data.synthetic.shape".to_string()));
        // Each sample fits, the batch does not: 200 times 8 x 512 x 512 activations.
        let r = training_job(&atj(
            "{data: {synthetic: {shape: [3, 512, 512], samples: 1000}}, training: {batchSize: 200}}",
        ));
        assert_eq!(fields(r), ["spec.training.batchSize"]);
        assert_eq!(fields(training_job(&atj("{}"))), Vec::<String>::new());
        // A stored job is not held to them: its agent refuses it when it runs.
        let big = "{data: {synthetic: {shape: [3, 512, 512], samples: 1000}}, training: {batchSize: 200}}";
        assert_eq!(stored_training_job(&atj(big)), Ok(()));
    }

    /// A training step keeps every layer's activations, and lowers each layer's input for
    /// its backward pass: bounded as a whole, not only tensor by tensor.
    #[test]
    fn what_a_training_step_holds_is_bounded() {
        let layer = |i: u32| Conv2dSpec {
            padding: [1, 1],
            ..Conv2dSpec::new(if i == 0 { 3 } else { 64 }, 64, [3, 3])
        };
        // 64 x 128 x 128 activations, 1M values each: one layer's batch of 256 fits, 64
        // layers' do not.
        let layers: Vec<_> = (0..64).map(layer).collect();
        assert_eq!(model(&layers[..1], [3, 128, 128], 256), Ok(()));
        assert_eq!(
            fields(model(&layers, [3, 128, 128], 256)),
            ["spec.training.batchSize"]
        );
        // Each tensor fits; the lowered input, 4096 x 4096 taps over as many outputs, does not.
        let wide = Conv2dSpec {
            padding: [2047, 2047],
            ..Conv2dSpec::new(1, 1, [4096, 4096])
        };
        assert_eq!(
            fields(model(&[wide], [1, 4096, 4096], 1)),
            ["spec.model.layers[0].conv2d"]
        );
        // Admission says the same where it knows the shapes.
        let job = atj(
            "{data: {synthetic: {shape: [1, 4096, 4096]}}, training: {batchSize: 1}, model: {layers: [{name: w, conv2d: {inChannels: 1, outChannels: 1, kernelSize: [4096, 4096], padding: [2047, 2047]}}]}}",
        );
        assert_eq!(fields(training_job(&job)), ["spec.model.layers[0].conv2d"]);
        // Where a layer from a KernelDeployment hides the shapes after it, the agent finds
        // what admission could not: a 1x1 layer padded to 2^26 outputs.
        let padded = Conv2dSpec {
            padding: [4096, 4096],
            ..Conv2dSpec::new(3, 3, [1, 1])
        };
        let admitted = atj(
            "{model: {layers: [{name: k, kernelDeploymentRef: k}, {name: p, conv2d: {inChannels: 3, outChannels: 3, kernelSize: [1, 1], padding: [4096, 4096]}}]}}",
        );
        assert_eq!(training_job(&admitted), Ok(()));
        let frozen = Conv2dSpec::new(3, 3, [1, 1]);
        let errors = model(&[frozen, padded], [3, 8, 8], 1).unwrap_err();
        assert_eq!(errors[0].field, "spec.model.layers[1].conv2d");
        assert!(
            errors[0].message.contains("one sample's output"),
            "{errors:?}"
        );
    }

    #[test]
    fn input_size_must_not_be_empty() {
        // Padding alone would give this input an output, over nothing but zeros.
        let r = kernel_deployment(&kd("kernel: {inputSize: [0, 32]}"));
        assert_eq!(fields(r), ["spec.kernel.inputSize"]);
    }

    #[test]
    fn output_must_not_be_empty() {
        let r = kernel_deployment(&kd(
            "kernel: {inputSize: [2, 2], conv2d: {kernelSize: [5, 5], padding: [0, 0]}}",
        ));
        assert_eq!(fields(r), ["spec.kernel.conv2d"]);
    }

    #[test]
    fn urls_need_an_allowed_scheme_and_a_path() {
        for (url, ok) in [
            ("file:///var/lib/k.safetensors", true),
            ("s3://bucket/key", true),
            ("http://127.0.0.1:8080/k", true),
            ("file://relative", false),
            ("s3://bucket", false),
            ("https:///path", false),
            ("ftp://host/k", false),
            ("s3://bucket/", false),
            ("https://host?x=1", false),
            ("https://host#f", false),
            ("https://host/k?v=2", true),
        ] {
            let spec = kd(&format!("kernel: {{artifact: {{url: {url:?}}}}}"));
            assert_eq!(kernel_deployment(&spec).is_ok(), ok, "{url}");
        }
    }

    #[test]
    fn selector_operators_are_checked() {
        let r = kernel_deployment(&kd(
            "nodeSelector: {matchExpressions: [{key: a, operator: In}, {key: b, operator: Near, values: [x]}, {key: c, operator: Exists, values: [y]}]}",
        ));
        assert_eq!(
            fields(r),
            [
                "spec.nodeSelector.matchExpressions[0].values",
                "spec.nodeSelector.matchExpressions[1].operator",
                "spec.nodeSelector.matchExpressions[2].values"
            ]
        );
    }

    #[test]
    fn analysis_bounds() {
        let r = kernel_deployment(&kd(
            "rollout: {progressDeadline: 0s, analysis: {interval: 0s, minSuccessRate: 1.5, maxOverheadRatio: 0, maxNumericDiff: -1, minSamples: 0, failureLimit: 0}}",
        ));
        assert_eq!(
            fields(r),
            [
                "spec.rollout.progressDeadline",
                "spec.rollout.analysis.interval",
                "spec.rollout.analysis.minSuccessRate",
                "spec.rollout.analysis.maxOverheadRatio",
                "spec.rollout.analysis.maxNumericDiff",
                "spec.rollout.analysis.minSamples",
                "spec.rollout.analysis.failureLimit"
            ]
        );
    }

    #[test]
    fn layers_chain_channels_and_shapes() {
        let r = atj_ok(
            "model: {layers: [{name: a, conv2d: {inChannels: 4, outChannels: 8, kernelSize: [3, 3]}}]}",
        );
        assert_eq!(fields(r), ["spec.model.layers[0].conv2d.inChannels"]);
        let r = atj_ok(
            "{data: {synthetic: {shape: [3, 4, 4]}}, model: {layers: [{name: a, conv2d: {inChannels: 3, outChannels: 8, kernelSize: [5, 5]}}]}}",
        );
        assert_eq!(fields(r), ["spec.model.layers[0].conv2d"]);
    }

    #[test]
    fn layers_need_exactly_one_source_and_unique_names() {
        let r = atj_ok(
            "model: {layers: [{name: a, kernelDeploymentRef: k, conv2d: {inChannels: 3, outChannels: 3, kernelSize: [1, 1]}}, {name: a}]}",
        );
        assert_eq!(
            fields(r),
            [
                "spec.model.layers[0]",
                "spec.model.layers[1].name",
                "spec.model.layers[1]"
            ]
        );
        assert_eq!(
            atj_ok(
                "model: {layers: [{name: a, kernelDeploymentRef: k}, {name: b, conv2d: {inChannels: 64, outChannels: 3, kernelSize: [1, 1]}}]}"
            ),
            Ok(())
        );
        let r = atj_ok("model: {layers: [{name: a, kernelDeploymentRef: k}]}");
        assert_eq!(fields(r), ["spec.model.layers"]);
    }

    #[test]
    fn only_the_run_policy_changes_after_creation() {
        let old = atj("{}");
        let suspended = atj("runPolicy: {suspend: true, activeDeadlineSeconds: 60}");
        assert_eq!(training_job_update(&old, &suspended), Ok(()));
        let changed = atj("{training: {steps: 20}, placement: {replicas: 2}}");
        let errs = training_job_update(&old, &changed).unwrap_err();
        assert_eq!(
            errs.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(),
            ["spec.training", "spec.placement"]
        );
        assert!(errs[0].message.contains("only spec.runPolicy may change"));
    }

    #[test]
    fn data_training_and_pipeline_rules() {
        let r = atj_ok("data: {artifact: {url: \"s3://b/k\", sha256: \"00\"}}");
        assert_eq!(fields(r), ["spec.data"]);
        let r = atj_ok("training: {batchSize: 128, learningRate: -1, momentum: 1}");
        assert_eq!(
            fields(r),
            [
                "spec.training.learningRate",
                "spec.training.momentum",
                "spec.training.batchSize"
            ]
        );
        let r = atj_ok("pipeline: {mode: triple, prefetchDepth: 1}");
        let errs = r.unwrap_err();
        assert_eq!(
            errs[0].to_string(),
            "spec.pipeline.prefetchDepth: must be at least 2 for triple buffering"
        );
    }
}
