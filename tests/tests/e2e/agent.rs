//! The agent publishes its node's report and keeps its heartbeat fresh.

use std::time::Duration;

use kernelflow_crds::NodeReport;
use kube::api::Api;

use crate::{eventually, setup};

#[tokio::test]
async fn the_agent_reports_its_node() {
    let (env, client, ns) = setup("agent").await;
    let node = format!("node-{ns}");
    let agent = env
        .spawn(
            "kernelflow-agent",
            "agent",
            &["--node-name", &node, "--report-interval-seconds", "1"],
        )
        .expect("starting the agent");
    let reports: Api<NodeReport> = Api::all(client);
    let first = eventually(Duration::from_secs(30), "the node report", || async {
        reports.get_opt(&node).await.ok()?
    })
    .await;
    assert_eq!(first.spec.node_name, node);
    assert_eq!(first.spec.backend, "cpu");
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
