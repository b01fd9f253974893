//! The controllers accept valid objects: observedGeneration, the Accepted condition, an
//! Event, the drain finalizer; and the operator serves health and metrics.

use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kernelflow_crds::{AsyncTrainingJob, KernelDeployment};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

use crate::{eventually, kernel_deployment, merged, setup, training_job};

const WAIT: Duration = Duration::from_secs(30);

fn accepted(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == "Accepted" && c.status == "True" && c.reason == "Valid")
}

#[tokio::test]
async fn valid_objects_are_accepted_and_observed() {
    let (env, client, ns) = setup("controllers").await;
    let operator = env
        .spawn_operator(
            "controllers",
            &[
                "--watch-namespace",
                &ns,
                "--lease-name",
                &format!("kf-{ns}"),
            ],
        )
        .expect("starting the operator");

    // Both select this test's own pool, which has no nodes, so that other tests' GPU nodes
    // change nothing here.
    let pool = serde_json::json!({"matchLabels": {"pool": ns}});
    let kds: Api<KernelDeployment> = Api::namespaced(client.clone(), &ns);
    let kd = merged(
        kernel_deployment("conv"),
        serde_json::json!({"spec": {"nodeSelector": pool}}),
    );
    let kd: KernelDeployment = serde_json::from_value(kd).unwrap();
    kds.create(&PostParams::default(), &kd).await.unwrap();
    let seen = eventually(WAIT, "the KernelDeployment's status", || async {
        let kd = kds.get("conv").await.ok()?;
        let s = kd.status.as_ref()?;
        (s.observed_generation == Some(1) && accepted(&s.conditions)).then_some(kd)
    })
    .await;
    assert_eq!(
        seen.status.as_ref().unwrap().phase,
        kernelflow_crds::kernel_deployment::RolloutPhase::Pending
    );
    assert!(
        seen.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"kernelflow.dev/drain".to_string())
    );

    // A spec change is observed.
    let patch = serde_json::json!({"spec": {"paused": true}});
    kds.patch("conv", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually(WAIT, "observedGeneration 2", || async {
        (kds.get("conv").await.ok()?.status?.observed_generation == Some(2)).then_some(())
    })
    .await;

    let jobs: Api<AsyncTrainingJob> = Api::namespaced(client.clone(), &ns);
    // Its own pool, which has no nodes: the job waits for some (and runs on no other test's).
    let pool =
        serde_json::json!({"spec": {"placement": {"nodeSelector": {"matchLabels": {"pool": ns}}}}});
    let job: AsyncTrainingJob =
        serde_json::from_value(merged(training_job("train"), pool)).unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    eventually(WAIT, "the AsyncTrainingJob's status", || async {
        let s = jobs.get("train").await.ok()?.status?;
        let waiting = s
            .conditions
            .iter()
            .any(|c| c.type_ == "Created" && c.reason == "WaitingForNodes");
        (s.observed_generation == Some(1) && accepted(&s.conditions) && waiting).then_some(())
    })
    .await;

    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually(WAIT, "a Valid event for the KernelDeployment", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("Valid")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("conv")
            })
            .then_some(())
    })
    .await;

    // The finalizer lets deletion through.
    kds.delete("conv", &DeleteParams::default()).await.unwrap();
    eventually(WAIT, "the KernelDeployment to be deleted", || async {
        kds.get_opt("conv").await.ok()?.is_none().then_some(())
    })
    .await;

    assert_eq!(
        operator.get("/healthz").await.map(|r| r.0),
        Some(200),
        "{}",
        operator.log_tail()
    );
    assert_eq!(operator.get("/readyz").await.map(|r| r.0), Some(200));
    let (_, metrics) = operator.get("/metrics").await.unwrap();
    assert!(
        metrics.contains("kernelflow_reconciliations_total{controller=\"kerneldeployment\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kernelflow_reconcile_duration_seconds_bucket"),
        "{metrics}"
    );
}

/// The controllers write a status on the version they read it at: one built from a read that
/// another write has since overtaken (a reconcile on a cache behind the API server) is
/// refused, not written over what it did not see.
#[tokio::test]
async fn a_status_built_on_a_stale_read_is_refused() {
    use kernelflow_crds::kernel_deployment::{KernelDeploymentStatus, RolloutPhase};
    use kernelflow_operator::controller::write_status;

    let (_, client, ns) = setup("stale-status").await;
    let kds: Api<KernelDeployment> = Api::namespaced(client, &ns);
    let kd: KernelDeployment = serde_json::from_value(kernel_deployment("conv")).unwrap();
    kds.create(&PostParams::default(), &kd).await.unwrap();
    let read = kds.get("conv").await.unwrap();
    let none = KernelDeploymentStatus::default();
    let status = |phase, step| KernelDeploymentStatus {
        phase,
        current_step_index: Some(step),
        ..KernelDeploymentStatus::default()
    };
    let first = status(RolloutPhase::Warming, 0);
    assert!(write_status(&kds, &read, &none, &first).await.unwrap());
    let second = status(RolloutPhase::Progressing, 1);
    assert!(
        !write_status(&kds, &read, &none, &second).await.unwrap(),
        "written on a version since overtaken"
    );
    let fresh = kds.get("conv").await.unwrap();
    assert_eq!(fresh.status.as_ref(), Some(&first));
    assert!(write_status(&kds, &fresh, &first, &second).await.unwrap());
    assert_eq!(kds.get("conv").await.unwrap().status, Some(second));
}
