//! What the selected nodes say about a KernelDeployment's kernel: a pure summary of Nodes
//! and NodeReports, so that it is tested without a cluster.

use std::borrow::Borrow;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kernelflow_crds::kernel_deployment::NodeCounts;
use kernelflow_crds::{KernelDeployment, NodeReport};
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

/// The `KernelReady` condition's status, reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub status: &'static str,
    pub reason: String,
    pub message: String,
}

/// Reasons of failures that fetching again will not fix (the artifact itself is bad).
fn fatal(reason: &str) -> bool {
    !matches!(reason, "FetchFailed" | "NotFound" | "StoreUnavailable")
}

/// Summary of the kernel on the nodes `kd` selects. Reports older than `stale_after` count
/// as not reporting.
pub fn summarize(
    kd: &KernelDeployment,
    nodes: &[impl Borrow<Node>],
    reports: &[impl Borrow<NodeReport>],
    now: Timestamp,
    stale_after: Duration,
) -> (NodeCounts, Readiness, bool) {
    let stale_after = SignedDuration::try_from(stale_after).unwrap_or(SignedDuration::MAX);
    let selector = Selector::try_from(kd.spec.node_selector.clone()).ok();
    let (namespace, name) = (kd.namespace().unwrap_or_default(), kd.name_any());
    let digest = &kd.spec.kernel.artifact.sha256;
    let mut counts = NodeCounts::default();
    let mut failures = Vec::new();
    for node in nodes.iter().map(Borrow::borrow) {
        if !selector.as_ref().is_some_and(|s| s.matches(node.labels())) {
            continue;
        }
        counts.selected += 1;
        let node_name = node.name_any();
        let Some(report) = reports
            .iter()
            .map(Borrow::borrow)
            .find(|r: &&NodeReport| r.spec.node_name == node_name)
        else {
            continue;
        };
        // A heartbeat from the future (clock skew) counts as fresh.
        if now.duration_since(report.spec.heartbeat_time.0) > stale_after {
            continue;
        }
        counts.reporting += 1;
        let kernel = report
            .spec
            .kernels
            .iter()
            .find(|k| k.namespace == namespace && k.name == name && k.canary_sha256 == *digest);
        match kernel.map(|k| k.state.as_str()) {
            Some("Warm") => counts.warmed += 1,
            Some("Failed") => {
                counts.failed += 1;
                let k = kernel.expect("matched above");
                failures.push((
                    node_name,
                    k.reason.clone().unwrap_or_default(),
                    k.message.clone().unwrap_or_default(),
                ));
            }
            _ => {}
        }
    }
    let readiness = if let Some((node, reason, message)) = failures.first() {
        let more = match failures.len() {
            1 => String::new(),
            n => format!(" (and {} more nodes)", n - 1),
        };
        Readiness {
            status: "False",
            reason: reason.clone(),
            message: format!("node {node}: {message}{more}"),
        }
    } else if counts.selected == 0 {
        Readiness {
            status: "False",
            reason: "NoNodesSelected".into(),
            message: "no node matches spec.nodeSelector".into(),
        }
    } else if counts.warmed == counts.selected {
        Readiness {
            status: "True",
            reason: "AllNodesWarm".into(),
            message: format!(
                "the kernel is warm on all {} selected nodes",
                counts.selected
            ),
        }
    } else {
        Readiness {
            status: "Unknown",
            reason: "Warming".into(),
            message: format!(
                "{} of {} selected nodes warm ({} reporting)",
                counts.warmed, counts.selected, counts.reporting
            ),
        }
    };
    let unservable = failures.iter().any(|(_, reason, _)| fatal(reason));
    (counts, readiness, unservable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn node(name: &str, pool: &str) -> Node {
        serde_json::from_value(
            serde_json::json!({"metadata": {"name": name, "labels": {"pool": pool}}}),
        )
        .unwrap()
    }

    fn report(node: &str, state: &str, reason: Option<&str>, beat: Timestamp) -> NodeReport {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "NodeReport", "metadata": {"name": node},
            "spec": {"nodeName": node, "agentVersion": "0", "backend": "cpu", "heartbeatTime": Time(beat),
                     "kernels": [{"namespace": "ns", "name": "kd", "canarySha256": "a".repeat(64), "state": state,
                                  "reason": reason, "message": reason.map(|r| format!("{r} details"))}]}
        }))
        .unwrap()
    }

    fn kd() -> KernelDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment", "metadata": {"name": "kd", "namespace": "ns"},
            "spec": {"kernel": {"artifact": {"url": "file:///k", "sha256": "a".repeat(64)},
                                "conv2d": {"inChannels": 1, "outChannels": 1, "kernelSize": [1, 1]}},
                     "nodeSelector": {"matchLabels": {"pool": "gpu"}}}
        }))
        .unwrap()
    }

    const STALE: Duration = Duration::from_secs(30);

    #[test]
    fn counts_selected_reporting_warm_and_failed_nodes() {
        let now = Timestamp::now();
        let old = now - k8s_openapi::jiff::SignedDuration::from_secs(120);
        let nodes = [
            node("a", "gpu"),
            node("b", "gpu"),
            node("c", "gpu"),
            node("d", "cpu"),
        ];
        let reports = [
            report("a", "Warm", None, now),
            report("b", "Warming", None, now),
            report("c", "Warm", None, old),
            report("d", "Warm", None, now),
        ];
        let (counts, ready, unservable) = summarize(&kd(), &nodes, &reports, now, STALE);
        assert_eq!(
            counts,
            NodeCounts {
                selected: 3,
                warmed: 1,
                failed: 0,
                reporting: 2
            }
        );
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            ("Unknown", "Warming")
        );
        assert!(!unservable);
    }

    #[test]
    fn failures_name_their_node_and_reason() {
        let now = Timestamp::now();
        let nodes = [node("a", "gpu"), node("b", "gpu")];
        let reports = [
            report("a", "Failed", Some("DigestMismatch"), now),
            report("b", "Failed", Some("FetchFailed"), now),
        ];
        let (counts, ready, unservable) = summarize(&kd(), &nodes, &reports, now, STALE);
        assert_eq!(counts.failed, 2);
        assert_eq!(
            ready,
            Readiness {
                status: "False",
                reason: "DigestMismatch".into(),
                message: "node a: DigestMismatch details (and 1 more nodes)".into()
            }
        );
        assert!(unservable);
        let (_, _, unservable) = summarize(&kd(), &nodes[1..], &reports[1..], now, STALE);
        assert!(!unservable, "a store failure is retried, not fatal");
    }

    #[test]
    fn all_warm_and_none_selected() {
        let now = Timestamp::now();
        let (_, ready, _) = summarize(
            &kd(),
            &[node("a", "gpu")],
            &[report("a", "Warm", None, now)],
            now,
            STALE,
        );
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            ("True", "AllNodesWarm")
        );
        let (counts, ready, _) =
            summarize(&kd(), &[node("a", "cpu")], &[] as &[NodeReport], now, STALE);
        assert_eq!(
            (counts.selected, ready.reason.as_str()),
            (0, "NoNodesSelected")
        );
    }
}
