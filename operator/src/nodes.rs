//! What the selected nodes say about a KernelDeployment's kernel: a pure summary of Nodes
//! and NodeReports (warm state and the figures of the current step), so that it is tested
//! without a cluster.

use std::borrow::Borrow;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kernelflow_crds::kernel_deployment::{NodeCounts, WindowStart};
use kernelflow_crds::node_report::{KernelReport, RevisionFigures, ShadowFigures};
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

/// The figures of one step, summed over the nodes that reported them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Nodes whose figures are included.
    pub nodes: u32,
    /// Nodes that know whether the revisions' outputs are comparable.
    pub judges: u32,
    pub canary: RevisionFigures,
    pub stable: RevisionFigures,
    pub shadow: ShadowFigures,
}

impl Figures {
    /// Adds one node's figures.
    fn add(&mut self, k: &KernelReport) {
        self.canary = self.canary.plus(&k.canary);
        self.stable = self.stable.plus(&k.stable);
        let (s, o) = (&mut self.shadow, &k.shadow);
        // A node knows once it runs both revisions: it says comparable, or has paired them
        // and says not. One still warming says not for want of a revision, and would switch
        // the check off for every node. Those that know must all agree: nodes agree unless
        // an artifact is lying.
        if o.comparable || o.pairs > 0 {
            s.comparable = o.comparable && (self.judges == 0 || s.comparable);
            self.judges += 1;
        }
        *s = s.plus(o);
        self.nodes += 1;
    }

    /// What was counted since `start`, the step's largest difference and comparability as
    /// they are; `None` where a count fell (an agent restarted, or a node's figures left the
    /// sum), so that the window cannot be told.
    pub fn since(&self, start: &WindowStart) -> Option<Figures> {
        let s = &self.shadow;
        let seconds = |a: f64, b: f64| (a - b).max(0.0);
        Some(Figures {
            canary: self.canary.since(&start.canary)?,
            stable: self.stable.since(&start.stable)?,
            shadow: ShadowFigures {
                pairs: s.pairs.checked_sub(start.shadow_pairs)?,
                canary_seconds_sum: seconds(s.canary_seconds_sum, start.shadow_canary_seconds_sum),
                stable_seconds_sum: seconds(s.stable_seconds_sum, start.shadow_stable_seconds_sum),
                ..s.clone()
            },
            ..self.clone()
        })
    }

    /// A window opening at `time` on these counts.
    pub fn start(&self, time: Time) -> WindowStart {
        WindowStart {
            time,
            canary: self.canary.clone(),
            stable: self.stable.clone(),
            shadow_pairs: self.shadow.pairs,
            shadow_canary_seconds_sum: self.shadow.canary_seconds_sum,
            shadow_stable_seconds_sum: self.shadow.stable_seconds_sum,
        }
    }
}

/// What the selected nodes say about one KernelDeployment.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub counts: NodeCounts,
    pub readiness: Readiness,
    /// Some node refused the artifact for a reason that fetching again will not fix.
    pub unservable: bool,
    /// The epoch the figures are for.
    pub epoch: u64,
    /// Figures for `epoch`, from the reporting selected nodes that serve it.
    pub figures: Figures,
}

/// Whether a node's report is recent enough to count; a heartbeat from the future (clock
/// skew) counts as fresh.
pub fn fresh(report: &NodeReport, now: Timestamp, stale_after: Duration) -> bool {
    let stale_after = SignedDuration::try_from(stale_after).unwrap_or(SignedDuration::MAX);
    now.duration_since(report.spec.heartbeat_time.0) <= stale_after
}

/// Summary of the kernel with artifact `digest` on the nodes `kd` selects, with the figures
/// the nodes report for `epoch`. Reports older than `stale_after` count as not reporting.
pub fn summarize(
    kd: &KernelDeployment,
    digest: &str,
    epoch: u64,
    nodes: &[impl Borrow<Node>],
    reports: &[impl Borrow<NodeReport>],
    now: Timestamp,
    stale_after: Duration,
) -> Summary {
    let selector = Selector::try_from(kd.spec.node_selector.clone()).ok();
    let (namespace, name) = (kd.namespace().unwrap_or_default(), kd.name_any());
    let mut counts = NodeCounts::default();
    let mut figures = Figures::default();
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
        if !fresh(report, now, stale_after) {
            continue;
        }
        counts.reporting += 1;
        let kernel = report
            .spec
            .kernels
            .iter()
            .find(|k| k.namespace == namespace && k.name == name && k.canary_sha256 == digest);
        if let Some(k) = kernel.filter(|k| k.epoch == Some(epoch)) {
            figures.add(k);
        }
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
    // A failure no retry fixes is the one to name, wherever its node came in the list.
    let named = failures
        .iter()
        .find(|(_, reason, _)| fatal(reason))
        .or(failures.first());
    let readiness = if let Some((node, reason, message)) = named {
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
    Summary {
        counts,
        readiness,
        unservable,
        epoch,
        figures,
    }
}

#[cfg(test)]
pub(crate) mod tests {
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

    pub(crate) fn kd() -> KernelDeployment {
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
        let summary = summarize(&kd(), &"a".repeat(64), 1, &nodes, &reports, now, STALE);
        assert_eq!(
            summary.counts,
            NodeCounts {
                selected: 3,
                warmed: 1,
                failed: 0,
                reporting: 2
            }
        );
        assert_eq!(
            (summary.readiness.status, summary.readiness.reason.as_str()),
            ("Unknown", "Warming")
        );
        assert!(!summary.unservable);
    }

    #[test]
    fn failures_name_their_node_and_reason() {
        let now = Timestamp::now();
        let nodes = [node("a", "gpu"), node("b", "gpu")];
        let reports = [
            report("a", "Failed", Some("DigestMismatch"), now),
            report("b", "Failed", Some("FetchFailed"), now),
        ];
        let summary = summarize(&kd(), &"a".repeat(64), 1, &nodes, &reports, now, STALE);
        assert_eq!(summary.counts.failed, 2);
        assert_eq!(
            summary.readiness,
            Readiness {
                status: "False",
                reason: "DigestMismatch".into(),
                message: "node a: DigestMismatch details (and 1 more nodes)".into()
            }
        );
        assert!(summary.unservable);
        let summary = summarize(
            &kd(),
            &"a".repeat(64),
            1,
            &nodes[1..],
            &reports[1..],
            now,
            STALE,
        );
        assert!(!summary.unservable, "a store failure is retried, not fatal");
        // The fatal failure is named even when a retried one comes first.
        let reports = [
            report("a", "Failed", Some("FetchFailed"), now),
            report("b", "Failed", Some("DigestMismatch"), now),
        ];
        let summary = summarize(&kd(), &"a".repeat(64), 1, &nodes, &reports, now, STALE);
        assert!(summary.unservable);
        assert_eq!(summary.readiness.reason, "DigestMismatch");
        assert!(summary.readiness.message.starts_with("node b:"));
    }

    #[test]
    fn all_warm_and_none_selected() {
        let now = Timestamp::now();
        let digest = "a".repeat(64);
        let summary = summarize(
            &kd(),
            &digest,
            1,
            &[node("a", "gpu")],
            &[report("a", "Warm", None, now)],
            now,
            STALE,
        );
        assert_eq!(
            (summary.readiness.status, summary.readiness.reason.as_str()),
            ("True", "AllNodesWarm")
        );
        let summary = summarize(
            &kd(),
            &digest,
            1,
            &[node("a", "cpu")],
            &[] as &[NodeReport],
            now,
            STALE,
        );
        assert_eq!(
            (summary.counts.selected, summary.readiness.reason.as_str()),
            (0, "NoNodesSelected")
        );
    }

    fn with_figures(
        mut r: NodeReport,
        epoch: u64,
        ops: u64,
        failures: u64,
        diff: f64,
    ) -> NodeReport {
        let k = &mut r.spec.kernels[0];
        k.epoch = Some(epoch);
        k.canary.ops = ops;
        k.canary.failures = failures;
        k.stable.ops = ops;
        k.shadow = ShadowFigures {
            pairs: ops,
            canary_seconds_sum: 1.0,
            stable_seconds_sum: 2.0,
            comparable: true,
            max_numeric_diff: Some(diff),
        };
        r
    }

    #[test]
    fn figures_sum_the_current_epoch_of_fresh_selected_nodes() {
        let now = Timestamp::now();
        let old = now - k8s_openapi::jiff::SignedDuration::from_secs(120);
        let nodes = [
            node("a", "gpu"),
            node("b", "gpu"),
            node("c", "gpu"),
            node("d", "gpu"),
            node("e", "cpu"),
        ];
        let reports = [
            with_figures(report("a", "Warm", None, now), 7, 10, 1, 1e-6),
            with_figures(report("b", "Warm", None, now), 7, 30, 0, 3e-6),
            with_figures(report("c", "Warm", None, now), 6, 1000, 0, 1.0),
            with_figures(report("d", "Warm", None, old), 7, 1000, 0, 1.0),
            with_figures(report("e", "Warm", None, now), 7, 1000, 0, 1.0),
        ];
        let f = summarize(&kd(), &"a".repeat(64), 7, &nodes, &reports, now, STALE).figures;
        assert_eq!(
            f.nodes, 2,
            "only a and b: c is at an old epoch, d stale, e not selected"
        );
        assert_eq!(
            (f.canary.ops, f.canary.failures, f.shadow.pairs),
            (40, 1, 40)
        );
        assert_eq!(f.shadow.max_numeric_diff, Some(3e-6));
        assert_eq!(
            (f.shadow.canary_seconds_sum, f.shadow.stable_seconds_sum),
            (2.0, 4.0)
        );
        assert!(f.shadow.comparable);

        let mut mixed = reports[1].clone();
        mixed.spec.kernels[0].shadow.comparable = false;
        mixed.spec.kernels[0].shadow.max_numeric_diff = Some(f64::NAN);
        let f = summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes[..2],
            &[reports[0].clone(), mixed.clone()],
            now,
            STALE,
        )
        .figures;
        assert!(!f.shadow.comparable);
        assert!(
            f.shadow.max_numeric_diff.unwrap().is_nan(),
            "a NaN difference is never hidden by max"
        );
        // Nor when the NaN comes first.
        let f = summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes[..2],
            &[mixed, reports[0].clone()],
            now,
            STALE,
        )
        .figures;
        assert!(f.shadow.max_numeric_diff.unwrap().is_nan());

        // A node without both revisions yet has no say; counts pin instead of wrapping.
        let mut warming = reports[1].clone();
        let k = &mut warming.spec.kernels[0];
        k.shadow = ShadowFigures::default();
        k.canary.ops = u64::MAX;
        let f = summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes[..2],
            &[reports[0].clone(), warming.clone()],
            now,
            STALE,
        )
        .figures;
        assert!(
            f.shadow.comparable,
            "the warming node switched the check off"
        );
        assert_eq!((f.judges, f.canary.ops), (1, u64::MAX));
        let f = summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes[1..2],
            &[warming],
            now,
            STALE,
        )
        .figures;
        assert!(!f.shadow.comparable && f.judges == 0);
    }
}
