//! Kernels warm on the nodes a KernelDeployment selects; a corrupt or missing artifact is
//! refused on every node and reaches the KernelDeployment as a condition naming the reason.

use std::time::Duration;

use kernelflow_crds::KernelDeployment;
use kernelflow_crds::kernel_deployment::RolloutPhase;
use kube::api::{Api, PostParams};

use crate::{eventually, gpu_nodes, kernel_deployment, merged, operator, pack, setup};

const WAIT: Duration = Duration::from_secs(60);

fn readiness(kd: &KernelDeployment) -> Option<(String, String, String)> {
    let c = kd
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "KernelReady")?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn kernels_warm_on_selected_nodes_and_bad_artifacts_are_refused() {
    let (env, client, ns) = setup("kernels").await;
    let agents = gpu_nodes(env, &client, &ns, &["a", "b"], &[]).await;
    let operator = operator(env, &ns);

    let (url, sha) = pack(env, &format!("{ns}-good"), 64, 1, &[]);
    let kds: Api<KernelDeployment> = Api::namespaced(client.clone(), &ns);
    let create = |name: &str, url: &str, sha: &str| {
        let kd = merged(
            kernel_deployment(name),
            serde_json::json!({"spec": {"kernel": {"artifact": {"url": url, "sha256": sha}}, "nodeSelector": {"matchLabels": {"pool": ns}}}}),
        );
        serde_json::from_value::<KernelDeployment>(kd).unwrap()
    };
    kds.create(&PostParams::default(), &create("good", &url, &sha))
        .await
        .unwrap();
    kds.create(
        &PostParams::default(),
        &create("corrupt", &url, &"0".repeat(64)),
    )
    .await
    .unwrap();
    // Its own digest: the agents' caches are content-addressed, so a missing URL pinned to the
    // good kernel's digest is served from memory once that kernel is warm.
    let missing = format!("file://{}/nonexistent.safetensors", env.logs.display());
    kds.create(
        &PostParams::default(),
        &create("missing", &missing, &"1".repeat(64)),
    )
    .await
    .unwrap();
    // Out of the agents' --file-root: refused unread.
    kds.create(
        &PostParams::default(),
        &create("forbidden", "file:///etc/hostname", &"2".repeat(64)),
    )
    .await
    .unwrap();

    let good = eventually(WAIT, "the good kernel warm on both nodes", || async {
        let kd = kds.get("good").await.ok()?;
        (readiness(&kd)?.0 == "True").then_some(kd)
    })
    .await;
    let status = good.status.unwrap();
    assert_eq!(
        (
            status.nodes.selected,
            status.nodes.warmed,
            status.nodes.reporting
        ),
        (2, 2, 2)
    );

    for (name, reason) in [
        ("corrupt", "DigestMismatch"),
        ("missing", "NotFound"),
        ("forbidden", "Forbidden"),
    ] {
        let (status, got, message) = eventually(WAIT, &format!("{name} refused"), || async {
            readiness(&kds.get(name).await.ok()?).filter(|r| r.0 == "False")
        })
        .await;
        assert_eq!(
            (status.as_str(), got.as_str()),
            ("False", reason),
            "{message}\n{}",
            operator.log_tail()
        );
        assert!(message.starts_with(&format!("node {ns}-")), "{message}");
    }
    // The condition turns False on the first node's refusal; the second reports on its own.
    let corrupt = eventually(WAIT, "corrupt refused on both nodes", || async {
        let status = kds.get("corrupt").await.ok()?.status?;
        (status.nodes.failed == 2).then_some(status)
    })
    .await;
    assert_eq!(
        corrupt.phase,
        RolloutPhase::Failed,
        "a bad artifact cannot be served"
    );
    for agent in &agents {
        let text = agent.get("/metrics").await.unwrap().1;
        assert!(
            text.contains(
                "kernelflow_agent_kernel_validation_failures_total{reason=\"DigestMismatch\"}"
            ),
            "{text}"
        );
    }
}
