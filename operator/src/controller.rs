//! The controllers of KernelDeployments and AsyncTrainingJobs.
//!
//! Each reconcile is a pipeline: read the object, validate it (client-free), build the
//! status, and apply it by server-side apply under the operator's field manager. Invalid
//! objects get a condition and wait for a change instead of being retried.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::validate::{self, FieldError};
use kernelflow_crds::{AsyncTrainingJob, KernelDeployment};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, instrument, warn};

use crate::FIELD_MANAGER;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Finalizer that lets a KernelDeployment drain its traffic before it goes away.
pub const KERNEL_DEPLOYMENT_FINALIZER: &str = "kernelflow.dev/drain";

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
}

impl Context {
    pub fn new(client: kube::Client, identity: &str, metrics: Metrics) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(identity.into()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
        }
    }
}

/// Runs both controllers until the future is dropped. `namespace` limits them to one.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, concurrency: u16) {
    let config = Config::default().concurrency(concurrency);
    let kd: Api<KernelDeployment> = api(&ctx.client, namespace.as_deref());
    let atj: Api<AsyncTrainingJob> = api(&ctx.client, namespace.as_deref());
    let kernels = Controller::new(kd, watcher::Config::default())
        .with_config(config.clone())
        .run(reconcile_kernel_deployment, error_policy, ctx.clone())
        .for_each(|_| async {});
    let jobs = Controller::new(atj, watcher::Config::default())
        .with_config(config)
        .run(reconcile_training_job, error_policy, ctx)
        .for_each(|_| async {});
    futures::join!(kernels, jobs);
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

fn error_policy<K>(_: Arc<K>, error: &Error, _: Arc<Context>) -> Action {
    warn!(%error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Times a reconcile and counts it and its errors.
async fn measured<F: Future<Output = Result<Action>>>(
    ctx: &Context,
    controller: &str,
    f: F,
) -> Result<Action> {
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
    if let Err(e) = &result {
        ctx.metrics
            .reconcile_errors
            .with_label_values(&[controller, e.label()])
            .inc();
    }
    result
}

#[instrument(skip_all, fields(namespace = kd.namespace(), name = kd.name_any()))]
async fn reconcile_kernel_deployment(
    kd: Arc<KernelDeployment>,
    ctx: Arc<Context>,
) -> Result<Action> {
    measured(&ctx, "kerneldeployment", async {
        let api: Api<KernelDeployment> =
            Api::namespaced(ctx.client.clone(), &kd.namespace().unwrap_or_default());
        finalizer(&api, KERNEL_DEPLOYMENT_FINALIZER, kd, |event| async {
            match event {
                Finalizer::Apply(kd) => {
                    let current = kd
                        .status
                        .as_ref()
                        .map(|s| (s.observed_generation, s.conditions.as_slice()));
                    accept(
                        &ctx,
                        &*kd,
                        validate::kernel_deployment(&kd.spec),
                        current,
                        "Pending",
                    )
                    .await
                }
                // Nothing runs on the nodes yet, so there is no traffic to drain.
                Finalizer::Cleanup(_) => Ok(Action::await_change()),
            }
        })
        .await
        .map_err(|e| Error::Finalizer(e.to_string()))
    })
    .await
}

#[instrument(skip_all, fields(namespace = job.namespace(), name = job.name_any()))]
async fn reconcile_training_job(job: Arc<AsyncTrainingJob>, ctx: Arc<Context>) -> Result<Action> {
    measured(&ctx, "asynctrainingjob", async {
        let current = job
            .status
            .as_ref()
            .map(|s| (s.observed_generation, s.conditions.as_slice()));
        accept(
            &ctx,
            &*job,
            validate::training_job(&job.spec),
            current,
            "Created",
        )
        .await
    })
    .await
}

/// Records whether the spec was accepted: `observedGeneration`, the `Accepted` condition and
/// an Event when the verdict changes. Writes nothing when the status already says so.
async fn accept<K>(
    ctx: &Context,
    obj: &K,
    verdict: Result<(), Vec<FieldError>>,
    current: Option<(Option<i64>, &[Condition])>,
    initial_phase: &str,
) -> Result<Action>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let generation = obj.meta().generation;
    let (observed, conditions) = current.unwrap_or((None, &[]));
    let (status, reason, message) = match &verdict {
        Ok(()) => ("True", "Valid", "the spec is valid".to_string()),
        Err(errors) => ("False", "InvalidSpec", validate::describe(errors)),
    };
    let accepted = condition("Accepted", status, reason, &message, generation, conditions);
    let previous = conditions.iter().find(|c| c.type_ == "Accepted");
    if observed == generation && previous == Some(&accepted) {
        return Ok(Action::await_change());
    }
    let mut status_body = serde_json::json!({
        "observedGeneration": generation,
        "conditions": [accepted],
    });
    if current.is_none() {
        status_body["phase"] = initial_phase.into();
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status_body,
    });
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    if previous.map(|c| (&c.status, &c.reason)) != Some((&accepted.status, &accepted.reason)) {
        info!(reason, "spec verdict changed");
        let event = Event {
            type_: if verdict.is_ok() {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: reason.into(),
            note: Some(truncate(&message, 1000)),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, "publishing an event failed");
        }
    }
    // An invalid spec waits for the user to change it; a valid one for the next event.
    Ok(Action::await_change())
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
    let last_transition_time = existing
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(
            || Time(Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
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
    fn truncate_counts_characters() {
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("ok", 5), "ok");
    }
}
