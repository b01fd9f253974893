//! What the selected nodes say about a KernelDeployment's kernel: a pure summary of Nodes
//! and NodeReports (warm state and the figures of the current step), so that it is tested
//! without a cluster.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kernelflow_crds::kernel_deployment::{NodeCounts, StepCounts};
use kernelflow_crds::node_report::{
    AGENT_FIELD_MANAGER, KernelReport, RevisionFigures, ShadowFigures,
};
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

/// Reasons of failures that fetching again will not fix (the artifact itself is bad). A
/// `Forbidden` URL is the agent's settings' doing (its `--file-root`), as missing store
/// credentials would be: the rollout waits for them, as it does for a store.
fn fatal(reason: &str) -> bool {
    !matches!(
        reason,
        "FetchFailed" | "NotFound" | "StoreUnavailable" | "Forbidden"
    )
}

/// Figures summed over nodes: one node's for the step, or a window's over the nodes.
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
    /// One node's figures for the step.
    fn of(k: &KernelReport) -> Self {
        // A node knows once it runs both revisions: it says comparable, or has paired them
        // and says not. One still warming says not for want of a revision, and would switch
        // the check off for every node.
        let judges = u32::from(k.shadow.comparable || k.shadow.pairs > 0);
        Figures {
            nodes: 1,
            judges,
            canary: k.canary.clone(),
            stable: k.stable.clone(),
            shadow: k.shadow.clone(),
        }
    }

    /// Adds other nodes' figures. Those that know whether outputs are comparable must all
    /// agree: nodes agree unless an artifact is lying.
    fn add(&mut self, o: &Figures) {
        self.canary = self.canary.plus(&o.canary);
        self.stable = self.stable.plus(&o.stable);
        let comparable = match (self.judges, o.judges) {
            (_, 0) => self.shadow.comparable,
            (0, _) => o.shadow.comparable,
            _ => self.shadow.comparable && o.shadow.comparable,
        };
        self.shadow = ShadowFigures {
            comparable,
            ..self.shadow.plus(&o.shadow)
        };
        self.nodes += o.nodes;
        self.judges += o.judges;
    }

    /// What was counted since `start`, the largest difference and comparability as they
    /// are; `None` where a count fell (the agent restarted and counts afresh).
    fn since(&self, start: &StepCounts) -> Option<Figures> {
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

    /// The counts a window opening now subtracts.
    fn counts(&self, counted_since: Option<Time>) -> StepCounts {
        StepCounts {
            counted_since,
            canary: self.canary.clone(),
            stable: self.stable.clone(),
            shadow_pairs: self.shadow.pairs,
            shadow_canary_seconds_sum: self.shadow.canary_seconds_sum,
            shadow_stable_seconds_sum: self.shadow.stable_seconds_sum,
        }
    }
}

/// One node's figures for the step, from its latest report, fresh or stale.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeFigures {
    pub figures: Figures,
    /// When the node's agent began counting them.
    pub since: Option<Time>,
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
    /// Each selected node's figures for `epoch`, by node name.
    pub figures: BTreeMap<String, NodeFigures>,
}

/// The figures of the window that opened on `start`: what each node counted since its entry
/// there; all that it counted where it has no entry, or where its agent has counted afresh
/// since (restarted: its counts began later, or fell). A node whose reports went stale is
/// judged on its last word, as it counted that in this window.
pub fn window(
    figures: &BTreeMap<String, NodeFigures>,
    start: &BTreeMap<String, StepCounts>,
) -> Figures {
    let second = |t: &Option<Time>| t.as_ref().map(|t| t.0.as_second());
    let mut window = Figures::default();
    for (node, n) in figures {
        let entry = start
            .get(node)
            .filter(|s| second(&s.counted_since) == second(&n.since));
        let since = entry.and_then(|s| n.figures.since(s));
        window.add(since.as_ref().unwrap_or(&n.figures));
    }
    window
}

/// The entries of a window opening now: each node's counts. A node that left the summary
/// has none: were it to come back, its agent would count afresh.
pub fn starts(figures: &BTreeMap<String, NodeFigures>) -> BTreeMap<String, StepCounts> {
    let counts = |n: &NodeFigures| n.figures.counts(n.since.clone());
    figures
        .iter()
        .map(|(node, n)| (node.clone(), counts(n)))
        .collect()
}

/// When a node's report was last written: the API server's time of the agent's last change
/// in its managed fields, so that an agent whose clock runs ahead does not look alive for
/// that much longer once it is gone; the heartbeat, on the agent's clock, stands in where
/// the server kept no time.
pub fn written(report: &NodeReport) -> Timestamp {
    let stored = report
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|f| f.manager.as_deref() == Some(AGENT_FIELD_MANAGER))
        .filter_map(|f| f.time.as_ref().map(|t| t.0))
        .max();
    stored.unwrap_or(report.spec.heartbeat_time.0)
}

/// Whether a node's report is recent enough to count: [`written`] within `stale_after`.
pub fn fresh(report: &NodeReport, now: Timestamp, stale_after: Duration) -> bool {
    let stale_after = SignedDuration::try_from(stale_after).unwrap_or(SignedDuration::MAX);
    now.duration_since(written(report)) <= stale_after
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
    let mut figures = BTreeMap::new();
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
        let kernel = report
            .spec
            .kernels
            .iter()
            .find(|k| k.namespace == namespace && k.name == name && k.canary_sha256 == digest);
        if let Some(k) = kernel.filter(|k| k.epoch == Some(epoch)) {
            let node = NodeFigures {
                figures: Figures::of(k),
                since: k.window_start.clone(),
            };
            figures.insert(node_name.clone(), node);
        }
        if !fresh(report, now, stale_after) {
            continue;
        }
        counts.reporting += 1;
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
        // Nor is a URL out of an agent's --file-root: the agent's settings, not the artifact.
        let forbidden = [report("b", "Failed", Some("Forbidden"), now)];
        let summary = summarize(
            &kd(),
            &"a".repeat(64),
            1,
            &nodes[1..],
            &forbidden,
            now,
            STALE,
        );
        assert!(!summary.unservable);
        assert_eq!(summary.readiness.reason, "Forbidden");
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
    fn figures_sum_the_current_epoch_of_selected_nodes() {
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
            with_figures(report("d", "Warm", None, old), 7, 100, 0, 2e-6),
            with_figures(report("e", "Warm", None, now), 7, 1000, 0, 1.0),
        ];
        let f = judged(summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes,
            &reports,
            now,
            STALE,
        ));
        assert_eq!(
            f.nodes, 3,
            "a, b and stale d's last word: c is at an old epoch, e not selected"
        );
        assert_eq!(
            (f.canary.ops, f.canary.failures, f.shadow.pairs),
            (140, 1, 140)
        );
        assert_eq!(f.shadow.max_numeric_diff, Some(3e-6));
        assert_eq!(
            (f.shadow.canary_seconds_sum, f.shadow.stable_seconds_sum),
            (3.0, 6.0)
        );
        assert!(f.shadow.comparable);

        let mut mixed = reports[1].clone();
        mixed.spec.kernels[0].shadow.comparable = false;
        mixed.spec.kernels[0].shadow.max_numeric_diff = Some(f64::NAN);
        let f = judged(summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes[..2],
            &[reports[0].clone(), mixed.clone()],
            now,
            STALE,
        ));
        assert!(!f.shadow.comparable);
        assert!(
            f.shadow.max_numeric_diff.unwrap().is_nan(),
            "a NaN difference is never hidden by max"
        );
        // Nor when the NaN comes first.
        let f = judged(summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes[..2],
            &[mixed, reports[0].clone()],
            now,
            STALE,
        ));
        assert!(f.shadow.max_numeric_diff.unwrap().is_nan());

        // A node without both revisions yet has no say; counts pin instead of wrapping.
        let mut warming = reports[1].clone();
        let k = &mut warming.spec.kernels[0];
        k.shadow = ShadowFigures::default();
        k.canary.ops = u64::MAX;
        let f = judged(summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes[..2],
            &[reports[0].clone(), warming.clone()],
            now,
            STALE,
        ));
        assert!(
            f.shadow.comparable,
            "the warming node switched the check off"
        );
        assert_eq!((f.judges, f.canary.ops), (1, u64::MAX));
        let f = judged(summarize(
            &kd(),
            &"a".repeat(64),
            7,
            &nodes[1..2],
            &[warming],
            now,
            STALE,
        ));
        assert!(!f.shadow.comparable && f.judges == 0);
    }

    /// A step's figures judged as one window, from its start.
    fn judged(summary: Summary) -> Figures {
        window(&summary.figures, &BTreeMap::new())
    }

    /// Windows take each node's counts since its entry, however nodes come and go: nothing is
    /// counted twice or lost, and a restarted agent's fresh counts are counted whole.
    #[test]
    fn a_window_counts_each_node_since_its_own_entry() {
        let now = Timestamp::now();
        let old = now - k8s_openapi::jiff::SignedDuration::from_secs(120);
        let nodes = [node("a", "gpu"), node("b", "gpu"), node("c", "gpu")];
        let sum = |reports: &[NodeReport]| {
            summarize(&kd(), &"a".repeat(64), 7, &nodes, reports, now, STALE).figures
        };
        let ops = |f: Figures| (f.nodes, f.canary.ops, f.canary.failures);
        let first = sum(&[
            with_figures(report("a", "Warm", None, now), 7, 100, 0, 0.0),
            with_figures(report("b", "Warm", None, now), 7, 50, 5, 0.0),
        ]);
        let opened = starts(&first);
        assert_eq!(ops(window(&first, &opened)), (2, 0, 0));

        // b goes quiet after 10 more operations, one failing: its last word is judged, and
        // the next window starts from it.
        let quiet = sum(&[
            with_figures(report("a", "Warm", None, now), 7, 130, 0, 0.0),
            with_figures(report("b", "Warm", None, old), 7, 60, 6, 0.0),
        ]);
        assert_eq!(ops(window(&quiet, &opened)), (2, 40, 1));
        let opened = starts(&quiet);

        // b comes back: only what it counted since its last word is new. c, new to the
        // step, brings all it counted.
        let back = sum(&[
            with_figures(report("a", "Warm", None, now), 7, 130, 0, 0.0),
            with_figures(report("b", "Warm", None, now), 7, 80, 6, 0.0),
            with_figures(report("c", "Warm", None, now), 7, 5, 1, 0.0),
        ]);
        assert_eq!(ops(window(&back, &opened)), (3, 25, 1));

        // a's agent restarts and counts afresh from a later time: its 10 are all new, even
        // once they pass its entry's 130.
        let mut restarted = with_figures(report("a", "Warm", None, now), 7, 10, 2, 0.0);
        restarted.spec.kernels[0].window_start = Some(Time(now));
        let f = sum(&[restarted.clone()]);
        assert_eq!(ops(window(&f, &opened)), (1, 10, 2));
        restarted.spec.kernels[0].canary.ops = 200;
        let f = sum(&[restarted]);
        assert_eq!(ops(window(&f, &opened)), (1, 200, 2));

        // Counts that fall without a later start are counted afresh too, never underflow.
        let f = sum(&[with_figures(report("a", "Warm", None, now), 7, 20, 0, 0.0)]);
        assert_eq!(ops(window(&f, &opened)), (1, 20, 0));

        // A node that left the summary leaves no entry: back, it counts afresh.
        assert_eq!(starts(&f).keys().collect::<Vec<_>>(), ["a"]);
    }

    /// Freshness is judged by when the API server stored the agent's last write, not by the
    /// agent's clock: one running ahead does not keep a dead node looking alive.
    #[test]
    fn a_report_is_as_fresh_as_the_server_last_stored_it() {
        let now = Timestamp::now();
        let minutes = |m: i64| k8s_openapi::jiff::SignedDuration::from_mins(m);
        let written = |r: &mut NodeReport, manager: &str, at: Timestamp| {
            let entry =
                serde_json::json!({"manager": manager, "operation": "Apply", "time": Time(at)});
            r.metadata.managed_fields = Some(vec![serde_json::from_value(entry).unwrap()]);
        };
        // Of several entries of the agent's (an apply and an update, say), the latest.
        let mut both = report("c", "Warm", None, now);
        written(&mut both, AGENT_FIELD_MANAGER, now - minutes(5));
        let latest = serde_json::json!({"manager": AGENT_FIELD_MANAGER, "operation": "Update", "time": Time(now)});
        let fields = both.metadata.managed_fields.as_mut().unwrap();
        fields.push(serde_json::from_value(latest).unwrap());
        assert!(fresh(&both, now, STALE));
        // The agent's clock is an hour ahead; the server last stored its report 2 min ago.
        let mut ahead = report("a", "Warm", None, now + minutes(60));
        assert!(
            fresh(&ahead, now, STALE),
            "no server time: the heartbeat stands in"
        );
        written(&mut ahead, AGENT_FIELD_MANAGER, now - minutes(2));
        assert!(!fresh(&ahead, now, STALE));
        // An hour behind, written just now.
        let mut behind = report("b", "Warm", None, now - minutes(60));
        written(&mut behind, AGENT_FIELD_MANAGER, now);
        assert!(fresh(&behind, now, STALE));
        // Another manager's write (a label by hand) says nothing of the agent.
        written(&mut behind, "kubectl-edit", now);
        assert!(!fresh(&behind, now, STALE));
    }
}
