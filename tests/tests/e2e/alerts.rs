//! The alerts: the rules file passes `promtool check rules` and its unit tests, every alert is
//! unit-tested and has its runbook, and a real Prometheus scraping a real agent fires one.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kernelflow_crds::KernelDeployment;
use kernelflow_e2e::cluster::tool;
use kernelflow_e2e::prometheus::{Prometheus, RULES, Target};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

use crate::{eventually, kernel_deployment, merged, setup};

const UNIT_TESTS: &str = "tests/alerts/prometheus-rules.test.yaml";
const RUNBOOKS: &str = "docs/operations.md";
const RUNBOOK_BASE: &str = "https://github.com/kernelflow/kernelflow/blob/main/docs/operations.md";

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn promtool(args: &[&str]) {
    let out = Command::new(tool("promtool").unwrap())
        .args(args)
        .current_dir(root())
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool {}:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn read_yaml(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn alert_rules_pass_promtool_and_each_has_a_unit_test_and_a_runbook() {
    promtool(&["check", "rules", RULES]);
    promtool(&["test", "rules", UNIT_TESTS]);

    let rules = read_yaml(RULES);
    let tests = read_yaml(UNIT_TESTS);
    let runbooks = std::fs::read_to_string(root().join(RUNBOOKS)).unwrap();
    let tested: Vec<&str> = tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .filter(|case| case["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()))
        .filter_map(|case| case["alertname"].as_str())
        .collect();
    let alerts: Vec<&serde_json::Value> = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .filter(|r| r["alert"].is_string())
        .collect();
    assert!(alerts.len() >= 10, "only {} alerts", alerts.len());
    for rule in alerts {
        let name = rule["alert"].as_str().unwrap();
        assert!(
            tested.contains(&name),
            "{name} has no unit test that fires it in {UNIT_TESTS}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        assert_eq!(
            rule["annotations"]["runbook_url"].as_str(),
            Some(format!("{RUNBOOK_BASE}#{}", name.to_lowercase()).as_str()),
            "{name}'s runbook_url"
        );
        assert!(
            runbooks.contains(&format!("\n### {name}\n")),
            "{RUNBOOKS} has no runbook section `### {name}`"
        );
    }
}

#[tokio::test]
async fn the_breaker_alert_fires_when_an_agent_cannot_reach_its_artifact_store() {
    let (env, client, ns) = setup("alerts").await;
    let node = format!("{ns}-gpu");
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": {"pool": ns}}});
    nodes
        .patch(
            &node,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&labels),
        )
        .await
        .unwrap();
    let agent = env
        .spawn(
            "kernelflow-agent",
            &node,
            &["--node-name", &node, "--report-interval-seconds", "1"],
        )
        .unwrap();
    let prometheus = Prometheus::start(RULES, &[Target::new(agent.http).label("node", &node)])
        .await
        .unwrap();

    // Nothing listens on the store's port (a privileged one, which no test process can take):
    // every fetch fails and the breaker opens.
    let store = "http://127.0.0.1:1".to_string();
    let kd = merged(
        kernel_deployment("unreachable"),
        serde_json::json!({"spec": {
            "kernel": {"artifact": {"url": format!("{store}/conv.safetensors")}},
            // Only this test's node: others' tests count the nodes their deployments select.
            "nodeSelector": {"matchLabels": {"pool": ns, "nvidia.com/gpu.present": null}},
        }}),
    );
    let kds: Api<KernelDeployment> = Api::namespaced(client.clone(), &ns);
    kds.create(&PostParams::default(), &serde_json::from_value(kd).unwrap())
        .await
        .unwrap();

    let open = format!("kernelflow_agent_artifact_store_breaker_open{{store=\"{store}\"}} == 1");
    let series = eventually(
        Duration::from_secs(30),
        "Prometheus to scrape the agent's open breaker",
        || async { prometheus.query(&open).await.ok().filter(|s| !s.is_empty()) },
    )
    .await;
    assert_eq!(series[0].0.get("node"), Some(&node), "{series:?}");

    // The alert holds for a minute before it fires.
    let alert = prometheus
        .wait_for_alert(
            "KernelflowArtifactStoreBreakerOpen",
            Duration::from_secs(180),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log_tail()));
    assert_eq!(alert.labels.get("store"), Some(&store));
    assert_eq!(alert.labels.get("node"), Some(&node));
    let description = &alert.annotations["description"];
    assert!(
        description.contains(&store) && description.contains(&node),
        "{description}"
    );
    nodes.delete(&node, &DeleteParams::default()).await.unwrap();
}
