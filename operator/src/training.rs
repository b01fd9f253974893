//! The AsyncTrainingJob controller: a thin I/O layer around [`state::decide`]. Each reconcile
//! reads the job, the Nodes and the NodeReports from caches, lets the state machine decide,
//! then writes the status (when it changed), publishes Events, and deletes the job when its
//! time to live is up.
//!
//! No finalizer: deleting a job needs no clean-up by the operator. The agents see the job
//! go, stop its workers and delete its checkpoints, and the job's metrics are read from the
//! controller's cache, so they go with it.

pub mod metrics;
pub mod state;

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::{AsyncTrainingJob, NodeReport};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tracing::instrument;

use crate::controller::{
    Context, STALE_RETRY, error_policy, measured, publish, publish_transitions, ran, write_status,
};
use crate::error::Result;
pub use state::Settings;

struct Training {
    shared: Arc<Context>,
    settings: Settings,
}

impl AsRef<Context> for Training {
    fn as_ref(&self) -> &Context {
        &self.shared
    }
}

/// Runs the controller until the future is dropped.
pub async fn run(
    shared: Arc<Context>,
    api: Api<AsyncTrainingJob>,
    config: Config,
    settings: Settings,
) {
    // A node report wakes the jobs whose workers it mentions.
    let controller = Controller::new(api, watcher::Config::default())
        .with_config(config)
        .watches(
            Api::<NodeReport>::all(shared.client.clone()),
            watcher::Config::default(),
            |report| {
                report
                    .spec
                    .workers
                    .into_iter()
                    .map(|w| ObjectRef::<AsyncTrainingJob>::new(&w.name).within(&w.namespace))
                    .collect::<Vec<_>>()
            },
        );
    let _published = shared.metrics.training_jobs.publish(controller.store());
    // Decisions made before the Node and NodeReport caches fill would take every worker's
    // node for gone.
    let _ = shared.nodes.wait_until_ready().await;
    let _ = shared.reports.wait_until_ready().await;
    let ctx = Arc::new(Training { shared, settings });
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(ran)
        .await;
}

#[instrument(skip_all, fields(namespace = job.namespace(), name = job.name_any()))]
async fn reconcile(job: Arc<AsyncTrainingJob>, ctx: Arc<Training>) -> Result<Action> {
    let shared = &ctx.shared;
    measured(shared, "asynctrainingjob", &*job, async {
        let now = Timestamp::now();
        let (nodes, reports) = observe(
            &job,
            &shared.nodes.state(),
            &shared.reports.state(),
            now,
            ctx.settings.grace,
        );
        let obs = state::Observation {
            now,
            nodes: &nodes,
            reports: &reports,
        };
        let decision = state::decide(&job, &obs, &ctx.settings);
        apply(shared, &job, decision).await
    })
    .await
}

/// The nodes as the job sees them (a node reports when its report is at most `grace` old),
/// and its workers' reports.
fn observe(
    job: &AsyncTrainingJob,
    nodes: &[Arc<Node>],
    reports: &[Arc<NodeReport>],
    now: Timestamp,
    grace: std::time::Duration,
) -> (
    Vec<state::NodeView>,
    Vec<(String, kernelflow_crds::node_report::WorkerReport)>,
) {
    let selector = Selector::try_from(job.spec.placement.node_selector.clone()).ok();
    let by_node: HashMap<&str, &NodeReport> = reports
        .iter()
        .map(|r| (r.spec.node_name.as_str(), r.as_ref()))
        .collect();
    let views = nodes
        .iter()
        .map(|node| {
            let name = node.name_any();
            let report = by_node.get(name.as_str());
            state::NodeView {
                selected: selector.as_ref().is_some_and(|s| s.matches(node.labels())),
                reporting: report.is_some_and(|r| crate::nodes::fresh(r, now, grace)),
                workers: report.map_or(0, |r| r.spec.workers.len()),
                name,
            }
        })
        .collect();
    let uid = job.uid().unwrap_or_default();
    let workers = reports
        .iter()
        .flat_map(|r| {
            r.spec
                .workers
                .iter()
                .filter(|w| w.uid == uid)
                .map(|w| (r.spec.node_name.clone(), w.clone()))
        })
        .collect();
    (views, workers)
}

/// Writes what the state machine decided.
async fn apply(ctx: &Context, job: &AsyncTrainingJob, d: state::Decision) -> Result<Action> {
    let api: Api<AsyncTrainingJob> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    let old = job.status.clone().unwrap_or_default();
    if d.status != old {
        if !write_status(&api, job, &old, &d.status).await? {
            return Ok(Action::requeue(STALE_RETRY));
        }
        publish_transitions(ctx, job, &old.conditions, &d.status.conditions).await;
    }
    for note in &d.notes {
        let (warning, reason, action) = (note.warning, note.reason, note.action);
        publish(ctx, job, warning, reason, action, &note.message).await;
    }
    if d.delete {
        match api
            .delete(&job.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::await_change());
    }
    Ok(d.requeue.map_or_else(Action::await_change, Action::requeue))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::SignedDuration;
    use kernelflow_crds::node_report::WorkerReport;

    fn node(name: &str, pool: &str) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": {"pool": pool}}}),
            )
            .unwrap(),
        )
    }

    fn report(node: &str, age: i64, uids: &[&str], now: Timestamp) -> Arc<NodeReport> {
        let mut r = NodeReport::new(
            node,
            serde_json::from_value(serde_json::json!({
                "nodeName": node, "agentVersion": "0", "backend": "cpu",
                "heartbeatTime": Time(now - SignedDuration::from_secs(age)),
            }))
            .unwrap(),
        );
        r.spec.workers = uids
            .iter()
            .map(|uid| WorkerReport {
                uid: uid.to_string(),
                ..WorkerReport::default()
            })
            .collect();
        Arc::new(r)
    }

    #[test]
    fn observation_marks_selected_and_reporting_nodes_and_takes_the_jobs_workers() {
        let job: AsyncTrainingJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "AsyncTrainingJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "u"},
            "spec": {
                "model": {"layers": [{"name": "a", "conv2d": {"inChannels": 1, "outChannels": 1, "kernelSize": [1, 1]}}]},
                "data": {"synthetic": {"shape": [1, 2, 2], "samples": 2}},
                "training": {"batchSize": 1, "steps": 1, "learningRate": 0.1},
                "placement": {"nodeSelector": {"matchLabels": {"pool": "gpu"}}}
            }
        }))
        .unwrap();
        let now = Timestamp::now();
        let nodes = [
            node("a", "gpu"),
            node("b", "gpu"),
            node("c", "cpu"),
            node("d", "gpu"),
        ];
        let reports = [
            report("a", 1, &["u", "other"], now),
            report("b", 61, &["u"], now),
            report("c", 1, &[], now),
        ];
        let (views, workers) = observe(
            &job,
            &nodes,
            &reports,
            now,
            std::time::Duration::from_secs(60),
        );
        let seen: Vec<_> = views
            .iter()
            .map(|v| (v.name.as_str(), v.selected, v.reporting, v.workers))
            .collect();
        assert_eq!(
            seen,
            [
                ("a", true, true, 2),
                ("b", true, false, 1),
                ("c", false, true, 0),
                ("d", true, false, 0)
            ]
        );
        let from: Vec<_> = workers.iter().map(|(node, _)| node.as_str()).collect();
        assert_eq!(from, ["a", "b"], "only this job's workers, with their node");
    }
}
