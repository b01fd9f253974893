//! The agent publishes its node's report and keeps its heartbeat fresh.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kernelflow_crds::NodeReport;
use kube::api::Api;

use crate::{eventually, gpu_node, setup};

#[tokio::test]
async fn the_agent_reports_its_node() {
    let (env, client, ns) = setup("agent").await;
    let node = format!("node-{ns}");
    let agent = gpu_node(env, &client, &node, serde_json::json!({}), &[]).await;
    let reports: Api<NodeReport> = Api::all(client.clone());
    let first = eventually(Duration::from_secs(30), "the node report", || async {
        reports.get_opt(&node).await.ok()?
    })
    .await;
    assert_eq!(first.spec.node_name, node);
    assert_eq!(first.spec.backend, "cpu");
    // Ready once its caches have synced and a report is written.
    agent.wait_ready(Duration::from_secs(30)).await.unwrap();
    // Owned by its Node, whose deletion takes the report along.
    let uid = Api::<Node>::all(client)
        .get(&node)
        .await
        .unwrap()
        .metadata
        .uid;
    let owners = first.metadata.owner_references.unwrap_or_default();
    assert_eq!(
        owners
            .iter()
            .map(|o| (o.kind.as_str(), &o.name, Some(&o.uid)))
            .collect::<Vec<_>>(),
        [("Node", &node, uid.as_ref())]
    );
    let beat = first.spec.heartbeat_time.clone();
    eventually(Duration::from_secs(30), "a newer heartbeat", || async {
        let r = reports.get(&node).await.ok()?;
        (r.spec.heartbeat_time.0 > beat.0).then_some(())
    })
    .await;
    // The agent counts a report once its write returns, which can be after the API server
    // already shows it: wait for the count rather than read it once.
    eventually(Duration::from_secs(10), "two reports counted", || async {
        let n = agent.metric("kernelflow_agent_reports_total").await?;
        (n >= 2.0).then_some(())
    })
    .await;
}
