//! Kernels warm on the nodes a KernelDeployment selects; a corrupt or missing artifact is
//! refused on every node and reaches the KernelDeployment as a condition naming the reason.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kernelflow_crds::KernelDeployment;
use kernelflow_crds::kernel_deployment::RolloutPhase;
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::{eventually, kernel_deployment, merged, setup};

const WAIT: Duration = Duration::from_secs(60);

/// Packs a kernel into the logs directory; returns its file URL and sha256.
fn pack(env: &kernelflow_e2e::env::Shared, name: &str, seed: u64) -> (String, String) {
    let out = env.logs.join(format!("{name}.safetensors"));
    let sha = kernelflow_e2e::env::pack_kernel(&out, seed).expect("packing a kernel");
    (format!("file://{}", out.display()), sha)
}

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
    let nodes: Api<Node> = Api::all(client.clone());
    let mut agents = Vec::new();
    for n in ["a", "b"] {
        let name = format!("{ns}-{n}");
        let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"pool": ns, "nvidia.com/gpu.present": "true"}}});
        nodes
            .patch(
                &name,
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(&node),
            )
            .await
            .unwrap();
        let cache = env.logs.join(format!("cache-{name}"));
        agents.push(
            env.spawn(
                "kernelflow-agent",
                &name,
                &[
                    "--node-name",
                    &name,
                    "--report-interval-seconds",
                    "1",
                    "--cache-dir",
                    cache.to_str().unwrap(),
                ],
            )
            .unwrap(),
        );
    }
    let operator = env
        .spawn_operator(
            "kernels-operator",
            &[
                "--watch-namespace",
                &ns,
                "--lease-name",
                &format!("kf-{ns}"),
            ],
        )
        .unwrap();

    let (url, sha) = pack(env, &format!("{ns}-good"), 1);
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
    kds.create(
        &PostParams::default(),
        &create("missing", "file:///nonexistent/kernel.safetensors", &sha),
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

    for (name, reason) in [("corrupt", "DigestMismatch"), ("missing", "NotFound")] {
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
    let corrupt = kds.get("corrupt").await.unwrap().status.unwrap();
    assert_eq!(
        corrupt.phase,
        RolloutPhase::Failed,
        "a bad artifact cannot be served"
    );
    assert_eq!(corrupt.nodes.failed, 2);
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
