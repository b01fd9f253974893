//! The controllers of KernelDeployments and AsyncTrainingJobs.
//!
//! Each reconcile is a pipeline: read the object, validate it (client-free), build the
//! status, and write it under the operator's field manager, on the version read. Invalid
//! objects get a condition and wait for a change instead of being retried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::kernel_deployment::{
    ACTION_ANNOTATION, KernelDeploymentStatus, ManualAction, RolloutPhase,
};
use kernelflow_crds::validate::{self, FieldError};
use kernelflow_crds::{AsyncTrainingJob, KernelDeployment, NodeReport};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::{info, instrument, warn};

use crate::FIELD_MANAGER;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::rollout;

/// Finalizer that lets a KernelDeployment drain its traffic before it goes away.
pub const KERNEL_DEPLOYMENT_FINALIZER: &str = "kernelflow.dev/drain";

/// How old a node report may be before its node counts as not reporting.
pub const REPORT_STALE_AFTER: Duration = Duration::from_secs(60);

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub nodes: Store<Node>,
    pub reports: Store<NodeReport>,
    pub retries: Retries,
}

impl AsRef<Context> for Context {
    fn as_ref(&self) -> &Context {
        self
    }
}

/// Failed reconciles of each object, which space out its retries: 5 s after the first,
/// doubling up to 5 min, so that a failure that lasts (a write the API server forbids or
/// refuses) does not hammer it. The wait holds against the node reports that wake an object
/// every few seconds; a change to the object itself (a user mending it) ends it.
#[derive(Default)]
pub struct Retries(std::sync::Mutex<std::collections::HashMap<String, Backoff>>);

struct Backoff {
    failures: u32,
    until: Instant,
    /// The version that failed.
    version: Option<String>,
}

impl Retries {
    const FIRST: Duration = Duration::from_secs(5);
    const MOST: Duration = Duration::from_secs(300);
    /// An object not retried for this long is gone: a live one is, at least every 5 min.
    const FORGET: Duration = Duration::from_secs(3600);

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Backoff>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key of `obj`: its uid, so that a new object of the same name starts afresh.
    fn key<K: Resource>(obj: &K) -> String {
        obj.uid().unwrap_or_else(|| obj.name_any())
    }

    /// How long `obj` still waits after a failure, if it does and has not changed since.
    fn waiting<K: Resource>(&self, obj: &K, now: Instant) -> Option<Duration> {
        let failures = self.lock();
        let b = failures.get(&Self::key(obj))?;
        let wait = b.until.checked_duration_since(now)?;
        (b.version == obj.resource_version() && !wait.is_zero()).then_some(wait)
    }

    /// Counts a failure of `obj`'s reconcile; returns how long to wait before the next.
    fn failed<K: Resource>(&self, obj: &K, now: Instant) -> Duration {
        let mut failures = self.lock();
        failures.retain(|_, b| now.saturating_duration_since(b.until) < Self::FORGET);
        let b = failures.entry(Self::key(obj)).or_insert(Backoff {
            failures: 0,
            until: now,
            version: None,
        });
        b.failures = b.failures.saturating_add(1);
        let wait = Self::FIRST
            .saturating_mul(1 << (b.failures - 1).min(10))
            .min(Self::MOST);
        (b.until, b.version) = (now + wait, obj.resource_version());
        wait
    }

    fn succeeded<K: Resource>(&self, obj: &K) {
        self.lock().remove(&Self::key(obj));
    }
}

/// Runs both controllers until the future is dropped. `namespace` limits them to one.
pub async fn run(
    client: kube::Client,
    identity: String,
    metrics: Metrics,
    namespace: Option<String>,
    concurrency: u16,
    training: crate::training::Settings,
) {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (reports, report_writer) = reflector::store::<NodeReport>();
    let node_watch = reflector::reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .for_each(|r| watched("Node", r));
    let report_watch = reflector::reflector(
        report_writer,
        watcher(
            Api::<NodeReport>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .for_each(|r| watched("NodeReport", r));
    let reporter = Reporter {
        controller: FIELD_MANAGER.into(),
        instance: Some(identity),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let ctx = Arc::new(Context {
        recorder,
        client,
        metrics,
        nodes,
        reports,
        retries: Retries::default(),
    });
    let config = Config::default().concurrency(concurrency);
    let kd: Api<KernelDeployment> = api(&ctx.client, namespace.as_deref());
    let atj: Api<AsyncTrainingJob> = api(&ctx.client, namespace.as_deref());
    // A node report wakes the KernelDeployments it mentions.
    let kernels_ctx = ctx.clone();
    let kernels = Controller::new(kd, watcher::Config::default());
    // Held while this replica leads: the future is dropped when the Lease is lost.
    let _leading = ctx.metrics.lead(ctx.reports.clone(), kernels.store());
    let kernels = kernels
        .with_config(config.clone())
        .watches(
            Api::<NodeReport>::all(ctx.client.clone()),
            watcher::Config::default(),
            |report| {
                report
                    .spec
                    .kernels
                    .into_iter()
                    .map(|k| ObjectRef::<KernelDeployment>::new(&k.name).within(&k.namespace))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile_kernel_deployment, error_policy, ctx.clone())
        .for_each(ran);
    // Statuses built before the Node and NodeReport caches fill would report no nodes.
    let kernels = async move {
        let _ = kernels_ctx.nodes.wait_until_ready().await;
        let _ = kernels_ctx.reports.wait_until_ready().await;
        kernels.await
    };
    let jobs = crate::training::run(ctx, atj, config, training);
    futures::join!(kernels, jobs, node_watch, report_watch);
}

fn api<K: Resource<Scope = kube::core::NamespaceResourceScope>>(
    client: &kube::Client,
    ns: Option<&str>,
) -> Api<K>
where
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Logs a failed watch of a cache, which retries with backoff: unlogged, a cache that does
/// not fill (an object that does not deserialize fails every list) would leave the
/// controllers waiting on it in silence.
async fn watched<T>(kind: &str, r: Result<T, watcher::Error>) {
    if let Err(error) = r {
        warn!(kind, %error, "watch failed; retrying");
    }
}

/// Logs a controller's failures other than its reconciles' own, which [`error_policy`]
/// logs: its watch failing stalls every object of its kind.
pub(crate) async fn ran<K: Resource, E: std::error::Error, Q: std::error::Error>(
    r: Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<E, Q>>,
) {
    use kube::runtime::controller::Error as Failed;
    match r {
        Ok(_) | Err(Failed::ReconcilerFailed(..)) => {}
        Err(Failed::ObjectNotFound(object)) => {
            tracing::debug!(%object, "gone before its reconcile");
        }
        Err(error) => warn!(%error, "controller failed; retrying"),
    }
}

pub(crate) fn error_policy<K, C>(obj: Arc<K>, error: &Error, ctx: Arc<C>) -> Action
where
    K: Resource<DynamicType = ()>,
    C: AsRef<Context>,
{
    if let Error::Draining(_) = error {
        return Action::requeue(Duration::from_secs(1));
    }
    let wait = ctx.as_ref().as_ref().retries.failed(&*obj, Instant::now());
    warn!(%error, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

/// Times a reconcile and counts it and its errors.
pub(crate) async fn measured<K, F>(ctx: &Context, controller: &str, obj: &K, f: F) -> Result<Action>
where
    K: Resource<DynamicType = ()>,
    F: Future<Output = Result<Action>>,
{
    if let Some(wait) = ctx.retries.waiting(obj, Instant::now()) {
        return Ok(Action::requeue(wait));
    }
    let start = Instant::now();
    ctx.metrics
        .reconciliations
        .with_label_values(&[controller])
        .inc();
    let result = f.await;
    ctx.metrics
        .reconcile_duration
        .with_label_values(&[controller])
        .observe(start.elapsed().as_secs_f64());
    match &result {
        Ok(_) => ctx.retries.succeeded(obj),
        Err(Error::Draining(_)) => {}
        Err(e) => ctx
            .metrics
            .reconcile_errors
            .with_label_values(&[controller, e.label()])
            .inc(),
    }
    result
}

#[instrument(skip_all, fields(namespace = kd.namespace(), name = kd.name_any()))]
async fn reconcile_kernel_deployment(
    kd: Arc<KernelDeployment>,
    ctx: Arc<Context>,
) -> Result<Action> {
    // The finalizer takes `kd`; the backoff reads it first.
    let read = kd.clone();
    measured(&ctx, "kerneldeployment", &*read, async {
        let api: Api<KernelDeployment> =
            Api::namespaced(ctx.client.clone(), &kd.namespace().unwrap_or_default());
        finalizer(&api, KERNEL_DEPLOYMENT_FINALIZER, kd, |event| async {
            match event {
                Finalizer::Apply(kd) => apply_kernel_deployment(&ctx, &kd).await,
                Finalizer::Cleanup(kd) => drain(&ctx, &kd),
            }
        })
        .await
        .map_err(|e| match e {
            // The reconciler's own errors keep their kind (and metric label).
            kube::runtime::finalizer::Error::ApplyFailed(e)
            | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
            e => Error::Finalizer(e.to_string()),
        })
    })
    .await
}

/// Lets a deleted KernelDeployment go once no reporting node still lists it: agents stop
/// routing to a deployment marked for deletion and drop it from their report when its
/// operations in flight have finished.
fn drain(ctx: &Context, kd: &KernelDeployment) -> Result<Action> {
    let (namespace, name) = (kd.namespace().unwrap_or_default(), kd.name_any());
    let now = Timestamp::now();
    let serving = ctx
        .reports
        .state()
        .iter()
        .filter(|r| crate::nodes::fresh(r, now, REPORT_STALE_AFTER))
        .filter(|r| {
            r.spec
                .kernels
                .iter()
                .any(|k| k.namespace == namespace && k.name == name)
        })
        .count();
    if serving > 0 {
        return Err(Error::Draining(serving));
    }
    ctx.metrics.forget_rollout(&namespace, &name);
    info!("drained from every node");
    Ok(Action::await_change())
}

/// Validates the spec, runs the rollout state machine on what the nodes report, and applies
/// the resulting status, Events and metrics.
async fn apply_kernel_deployment(ctx: &Context, kd: &KernelDeployment) -> Result<Action> {
    let old = kd.status.clone().unwrap_or_default();
    let generation = kd.metadata.generation;
    let verdict = validate::kernel_deployment(&kd.spec);
    let accepted = accepted(&verdict, generation, &old.conditions);
    let (namespace, name) = (kd.namespace().unwrap_or_default(), kd.name_any());
    let (mut status, notes, wait, tally) = if verdict.is_ok() {
        let now = Timestamp::now();
        // The canary, if any, is always the spec's revision, and with no canary the stable
        // one is: either way the nodes should be warm with the spec's artifact.
        let summary = crate::nodes::summarize(
            kd,
            &kd.spec.kernel.artifact.sha256,
            old.step_epoch,
            &ctx.nodes.state(),
            &ctx.reports.state(),
            now,
            REPORT_STALE_AFTER,
        );
        let action = kd
            .annotations()
            .get(ACTION_ANNOTATION)
            .and_then(|v| Some((v.as_str(), ManualAction::parse(v).ok()?)));
        let decision = rollout::decide(
            &kd.spec,
            &old,
            &rollout::Observations {
                now,
                summary: &summary,
                action,
            },
        );
        // Counted once the status recording them is written, and a verdict once per analysis
        // window, not once per reconcile (every node report wakes one).
        let window = |s: &KernelDeploymentStatus| s.analysis.as_ref().and_then(|a| a.time.clone());
        let new_window = window(&decision.status) != window(&old);
        let tally = (
            decision.verdict.filter(|_| new_window).map(|v| v.label()),
            decision.finished,
        );
        let mut status = decision.status;
        status.conditions = vec![
            accepted,
            condition(
                "KernelReady",
                summary.readiness.status,
                &summary.readiness.reason,
                &summary.readiness.message,
                generation,
                &old.conditions,
            ),
            progressing(&status, &decision.notes, generation, &old.conditions),
        ];
        // A node that goes silent sends nothing: look again once its report would be stale,
        // so that readiness and node counts do not stay as they were.
        let wait = Action::requeue(decision.requeue.unwrap_or(REPORT_STALE_AFTER));
        (status, decision.notes, wait, tally)
    } else {
        // An invalid spec waits for the user to change it.
        let status = frozen(&old, accepted);
        (status, Vec::new(), Action::await_change(), (None, None))
    };
    status.observed_generation = generation;
    let api: Api<KernelDeployment> = Api::namespaced(ctx.client.clone(), &namespace);
    if status != old && !write_status(&api, kd, &old, &status).await? {
        return Ok(Action::requeue(STALE_RETRY));
    }
    if status != old {
        let (verdict, finished) = tally;
        if let Some(label) = verdict {
            ctx.metrics.analysis(&namespace, &name, label);
        }
        if let Some((outcome, took)) = finished {
            ctx.metrics.finished(&namespace, &name, outcome, took);
        }
        // Rollout events come from the machine's notes; these from the other conditions.
        let others = |c: &[Condition]| -> Vec<Condition> {
            c.iter()
                .filter(|c| c.type_ != "Progressing")
                .cloned()
                .collect()
        };
        publish_transitions(
            ctx,
            kd,
            &others(&old.conditions),
            &others(&status.conditions),
        )
        .await;
        // At once: a transition's Events should not hold the reconcile (and the queue).
        futures::future::join_all(notes.iter().map(|note| {
            info!(reason = note.reason, message = note.message, "rollout");
            publish(ctx, kd, note.warning, note.reason, "Rollout", &note.message)
        }))
        .await;
    }
    Ok(wait)
}

/// How soon a reconcile whose status write met a newer object runs again, if the watch
/// has not brought that object sooner.
pub(crate) const STALE_RETRY: Duration = Duration::from_secs(1);

/// Writes `new` as `obj`'s status where it was `old`, on the version `obj` was read at: a
/// reconcile that ran on a cache behind the API server (an earlier reconcile's write not yet
/// seen) is refused with a conflict instead of overwriting what it did not see and counting
/// again what it records. `Ok(false)` on that conflict.
///
/// A merge patch that names removed fields as null: server-side apply on the 1.20 API
/// server mangles some values (an empty string became null) and leaves an emptied parent
/// behind when a required field goes, and a status loses fields as it moves on (the canary
/// once it is promoted).
pub async fn write_status<K>(
    api: &Api<K>,
    obj: &K,
    old: &impl serde::Serialize,
    new: &impl serde::Serialize,
) -> Result<bool>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": obj.resource_version()},
        "status": merge_patch(&serde_json::to_value(old)?, &serde_json::to_value(new)?),
    });
    let pp = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match api
        .patch_status(&obj.name_any(), &pp, &Patch::Merge(patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// A JSON merge patch (RFC 7386) that turns `old` into `new`: all of `new`, and null for
/// every field of `old` that `new` lacks. (All of `new`, because `old` is the typed status
/// with defaults filled in, not necessarily what is stored.)
fn merge_patch(old: &serde_json::Value, new: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let mut patch = serde_json::Map::new();
            for (k, v) in n {
                let value = o
                    .get(k)
                    .map_or_else(|| v.clone(), |was| merge_patch(was, v));
                patch.insert(k.clone(), value);
            }
            for k in o.keys().filter(|k| !n.contains_key(*k)) {
                patch.insert(k.clone(), Value::Null);
            }
            Value::Object(patch)
        }
        _ => new.clone(),
    }
}

/// The `Progressing` condition: True while a rollout runs, False once it has ended or has
/// waited past its progress deadline, with the reason and figures of the ending (a rollback
/// names the figure and the limit).
fn progressing(
    status: &KernelDeploymentStatus,
    notes: &[rollout::Note],
    generation: Option<i64>,
    existing: &[Condition],
) -> Condition {
    use RolloutPhase::*;
    let (state, reason) = match status.phase {
        _ if status.progress_deadline_exceeded => ("False", "ProgressDeadlineExceeded"),
        Pending => ("Unknown", "WaitingForNodes"),
        Warming => ("True", "Warming"),
        Progressing => ("True", "StepRunning"),
        Paused => ("True", "Paused"),
        Healthy => ("False", "RolloutCompleted"),
        Degraded => ("False", "Degraded"),
        RolledBack => ("False", "RolledBack"),
        Failed => ("False", "Failed"),
    };
    let ending =
        matches!(status.phase, Degraded | RolledBack | Failed) || status.progress_deadline_exceeded;
    let message = notes
        .iter()
        .rev()
        // An ignored action says nothing about why the rollout ended.
        .find(|n| n.warning && ending && n.reason != "ActionIgnored")
        .map(|n| n.message.clone())
        .or_else(|| {
            existing
                .iter()
                .find(|c| ending && c.type_ == "Progressing" && c.reason == reason)
                .map(|c| c.message.clone())
        })
        .or_else(|| status.message.clone())
        .unwrap_or_default();
    condition("Progressing", state, reason, &message, generation, existing)
}

/// The `Accepted` condition for a validation verdict.
fn accepted(
    verdict: &Result<(), Vec<FieldError>>,
    generation: Option<i64>,
    existing: &[Condition],
) -> Condition {
    accepted_at(verdict, generation, existing, Timestamp::now())
}

/// The status of a deployment whose spec is invalid: the rollout stays where it stands,
/// traffic split included (as Argo Rollouts pauses on an invalid spec), under an
/// `Accepted=False` condition; once the spec is fixed it goes on from there. Like a pause,
/// the time frozen does not count against the progress deadline.
fn frozen(old: &KernelDeploymentStatus, accepted: Condition) -> KernelDeploymentStatus {
    let mut status = old.clone();
    status.waiting_since = None;
    status.conditions.retain(|c| c.type_ != accepted.type_);
    status.conditions.insert(0, accepted);
    status
}

/// [`accepted`] as of `now`.
pub(crate) fn accepted_at(
    verdict: &Result<(), Vec<FieldError>>,
    generation: Option<i64>,
    existing: &[Condition],
    now: Timestamp,
) -> Condition {
    match verdict {
        Ok(()) => condition_at(
            "Accepted",
            "True",
            "Valid",
            "the spec is valid",
            generation,
            existing,
            now,
        ),
        Err(errors) => condition_at(
            "Accepted",
            "False",
            "InvalidSpec",
            &validate::describe(errors),
            generation,
            existing,
            now,
        ),
    }
}

/// An Event for each condition whose status or reason changed: Normal when it holds (or is
/// settling), Warning when it does not.
pub(crate) async fn publish_transitions<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    old: &[Condition],
    new: &[Condition],
) {
    for c in new {
        let before = old.iter().find(|o| o.type_ == c.type_);
        if before.is_some_and(|b| b.status == c.status && b.reason == c.reason) {
            continue;
        }
        info!(
            condition = c.type_,
            status = c.status,
            reason = c.reason,
            "condition changed"
        );
        publish(
            ctx,
            obj,
            c.status == "False",
            &c.reason,
            &c.type_,
            &c.message,
        )
        .await;
    }
}

/// Publishes one Event; a failure is logged, never fatal to the reconcile.
pub(crate) async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    warning: bool,
    reason: &str,
    action: &str,
    message: &str,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(truncate(message, NOTE_BYTES)),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        warn!(error = %e, "publishing an event failed");
    }
}

/// A condition, keeping the previous transition time when its status did not change.
pub fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    existing: &[Condition],
) -> Condition {
    condition_at(
        type_,
        status,
        reason,
        message,
        generation,
        existing,
        Timestamp::now(),
    )
}

/// [`condition`] as of `now`, for callers that take time as an input.
pub fn condition_at(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    existing: &[Condition],
    now: Timestamp,
) -> Condition {
    let last_transition_time = existing
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// The API server refuses an Event whose note is longer than 1 KiB.
const NOTE_BYTES: usize = 1024;

/// `s` cut to at most `max` bytes, an ellipsis marking the cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_keeps_its_transition_time_while_the_status_holds() {
        let first = condition("Accepted", "True", "Valid", "ok", Some(1), &[]);
        let again = condition(
            "Accepted",
            "True",
            "Valid",
            "ok",
            Some(2),
            std::slice::from_ref(&first),
        );
        assert_eq!(again.last_transition_time, first.last_transition_time);
        assert_eq!(again.observed_generation, Some(2));
        let mut old = first.clone();
        old.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let flipped = condition("Accepted", "False", "InvalidSpec", "bad", Some(3), &[old]);
        assert_ne!(flipped.last_transition_time, Time(Timestamp::UNIX_EPOCH));
    }

    #[test]
    fn an_ignored_action_keeps_the_reason_the_rollout_ended() {
        let status = KernelDeploymentStatus {
            phase: RolloutPhase::RolledBack,
            ..Default::default()
        };
        let why = "analysis failed 3 times at 10%: success rate 0.9 is under minSuccessRate 0.99";
        let ended = condition("Progressing", "False", "RolledBack", why, Some(1), &[]);
        let ignored = rollout::Note {
            warning: true,
            reason: "ActionIgnored",
            message: "abort does nothing in phase RolledBack".into(),
        };
        let c = progressing(&status, &[ignored], Some(1), &[ended]);
        assert_eq!(c.message, why);
    }

    #[test]
    fn a_wait_past_the_progress_deadline_turns_progressing_false_with_its_message() {
        let mut status = KernelDeploymentStatus {
            phase: RolloutPhase::Progressing,
            progress_deadline_exceeded: true,
            ..Default::default()
        };
        let stalled = rollout::Note {
            warning: true,
            reason: "ProgressDeadlineExceeded",
            message: "no progress within progressDeadline 10m: step 1 of 4 at 1%".into(),
        };
        let c = progressing(&status, std::slice::from_ref(&stalled), Some(1), &[]);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
            (
                "False",
                "ProgressDeadlineExceeded",
                stalled.message.as_str()
            )
        );
        // Later reconciles keep the message; progress turns it True again.
        let again = progressing(&status, &[], Some(1), std::slice::from_ref(&c));
        assert_eq!(again.message, stalled.message);
        status.progress_deadline_exceeded = false;
        let on = progressing(&status, &[], Some(1), &[again]);
        assert_eq!(
            (on.status.as_str(), on.reason.as_str()),
            ("True", "StepRunning")
        );
    }

    #[test]
    fn an_invalid_spec_freezes_the_rollout_where_it_stands() {
        let progressing = condition("Progressing", "True", "StepStarted", "50%", Some(1), &[]);
        let old = KernelDeploymentStatus {
            phase: RolloutPhase::Progressing,
            traffic_percent: 50,
            current_step_index: Some(2),
            conditions: vec![
                condition("Accepted", "True", "Valid", "ok", Some(1), &[]),
                progressing.clone(),
            ],
            waiting_since: Some(Time(Timestamp::UNIX_EPOCH)),
            ..Default::default()
        };
        let invalid = condition("Accepted", "False", "InvalidSpec", "bad", Some(2), &[]);
        let status = frozen(&old, invalid.clone());
        assert_eq!(status.conditions, [invalid, progressing]);
        assert_eq!(
            status.waiting_since, None,
            "the wait starts again once fixed"
        );
        assert_eq!(
            (
                status.phase,
                status.traffic_percent,
                status.current_step_index
            ),
            (RolloutPhase::Progressing, 50, Some(2))
        );
    }

    #[test]
    fn merge_patches_null_what_went_and_keep_what_stayed() {
        let old = serde_json::json!({"phase": "Progressing", "canary": {"a": 1, "b": 2}, "step": 3, "list": [1, 2]});
        let new = serde_json::json!({"phase": "Healthy", "canary": {"a": 1}, "list": [1]});
        let patch = merge_patch(&old, &new);
        assert_eq!(
            patch,
            serde_json::json!({"phase": "Healthy", "canary": {"a": 1, "b": null}, "step": null, "list": [1]})
        );
        let mut applied = old.clone();
        kernelflow_crds::apply_merge_patch(&mut applied, patch);
        assert_eq!(applied, new);
    }

    #[test]
    fn failed_reconciles_back_off_per_object_until_one_succeeds() {
        // Any object: the backoff reads only its uid and version.
        let object = |uid: &str, version: &str| k8s_openapi::api::core::v1::ConfigMap {
            metadata: kube::api::ObjectMeta {
                name: Some("k".into()),
                uid: Some(uid.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let (r, t0) = (Retries::default(), Instant::now());
        let a = object("a", "1");
        let waits: Vec<u64> = (0..9).map(|_| r.failed(&a, t0).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        // Node reports wake it meanwhile: it waits on, unless it changed.
        assert_eq!(
            r.waiting(&a, t0 + Duration::from_secs(100)),
            Some(Duration::from_secs(200))
        );
        assert_eq!(r.waiting(&object("a", "2"), t0), None, "mended");
        assert_eq!(
            r.waiting(&a, t0 + Duration::from_secs(300)),
            None,
            "its time"
        );
        assert_eq!(r.failed(&object("b", "1"), t0).as_secs(), 5, "per object");
        assert_eq!(
            r.failed(&object("c", "1"), t0).as_secs(),
            5,
            "a new one of that name"
        );
        r.succeeded(&a);
        assert_eq!(r.failed(&a, t0).as_secs(), 5, "reset");
        // An object not retried for an hour is gone, and forgotten.
        r.failed(&object("d", "1"), t0 + Duration::from_secs(7200));
        assert_eq!(r.lock().len(), 1);
    }

    #[test]
    fn truncate_counts_bytes_and_cuts_between_characters() {
        assert_eq!(truncate("ok", 2), "ok");
        assert_eq!(truncate("héllo", 6), "héllo");
        // "hé" is 3 bytes; with the 3-byte ellipsis, 5 leaves room for "h" only.
        assert_eq!(truncate("héllo", 5), "h…");
        let long = truncate(&"é".repeat(1000), NOTE_BYTES);
        assert!(
            long.len() <= NOTE_BYTES && long.ends_with('…'),
            "{}",
            long.len()
        );
    }
}
