//! `kubectl kernelflow`: manual rollout control (promote, abort, retry, pause, resume) and a
//! live view of a rollout. Actions go through the `kernelflow.dev/action` annotation and
//! `spec.paused`, exactly what a user could patch by hand; the view is a pure rendering of
//! a KernelDeployment and the node reports, so that it is tested without a cluster.

use std::fmt::Write as _;

use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::kernel_deployment::{ACTION_ANNOTATION, ManualAction, RolloutPhase};
use kernelflow_crds::{KernelDeployment, NodeReport};
use kube::ResourceExt;

use crate::rollout::describe;

/// The merge patch that asks for `action`; `id` makes the value new so the operator acts.
pub fn action_patch(action: ManualAction, id: &str) -> serde_json::Value {
    serde_json::json!({"metadata": {"annotations": {ACTION_ANNOTATION: format!("{}:{id}", action.verb())}}})
}

/// [`action_patch`] for `kd` as read, unless an earlier action is still pending: the one
/// annotation holds one action, and a second one before the operator took the first would
/// replace it unseen (two users, an abort and a promote). The patch carries the
/// resourceVersion read, so that a change in between makes it fail with a conflict.
pub fn action_patch_for(
    kd: &KernelDeployment,
    action: ManualAction,
    id: &str,
) -> Result<serde_json::Value, String> {
    let taken = kd.status.as_ref().and_then(|s| s.last_action.as_ref());
    if let Some(pending) = kd.annotations().get(ACTION_ANNOTATION)
        && Some(pending) != taken
    {
        return Err(format!(
            "action {pending:?} is still pending: the operator has not taken it yet (`kubectl annotate --overwrite` replaces it)"
        ));
    }
    let mut patch = action_patch(action, id);
    patch["metadata"]["resourceVersion"] = kd.resource_version().into();
    Ok(patch)
}

/// The merge patch that pauses or resumes a rollout.
pub fn pause_patch(paused: bool) -> serde_json::Value {
    serde_json::json!({"spec": {"paused": paused}})
}

/// A rollout as a tree: its revisions, steps, latest analysis and each node's figures.
pub fn render(kd: &KernelDeployment, reports: &[NodeReport]) -> String {
    let status = kd.status.clone().unwrap_or_default();
    let (ns, name) = (kd.namespace().unwrap_or_default(), kd.name_any());
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "{ns}/{name}  {:?}", status.phase);
    if let Some(m) = &status.message {
        let _ = writeln!(w, "  {m}");
    }
    if status.progress_deadline_exceeded {
        let since = status.waiting_since.as_ref().map(|t| t.0.to_string());
        let _ = writeln!(
            w,
            "  stalled: waiting on the nodes since {}, past progressDeadline {}",
            since.as_deref().unwrap_or("-"),
            kd.spec.rollout.progress_deadline
        );
    }
    for (label, rev) in [
        ("stable", &status.stable_revision),
        ("canary", &status.canary_revision),
    ] {
        if let Some(r) = rev {
            let _ = writeln!(w, "├── {label}: {}", describe(r));
        }
    }
    let _ = writeln!(w, "├── steps");
    let current = status.current_step_index.map(|i| i as usize);
    let rolling = matches!(
        status.phase,
        RolloutPhase::Progressing | RolloutPhase::Paused | RolloutPhase::Degraded
    );
    for (i, step) in kd.spec.rollout.steps.iter().enumerate() {
        let mark = match current {
            _ if status.phase == RolloutPhase::Healthy && status.canary_revision.is_none() => "✔",
            Some(c) if i < c => "✔",
            Some(c) if i == c && rolling => "►",
            Some(c) if i == c && status.phase == RolloutPhase::RolledBack => "✘",
            _ => " ",
        };
        let pause = step
            .pause
            .map_or("until promoted".to_string(), |p| format!("pause {p}"));
        let _ = writeln!(w, "│   {mark} {:>3}%  {pause}", step.traffic_percent);
    }
    if let Some(a) = &status.analysis {
        let _ = writeln!(
            w,
            "├── analysis: {} ({} failed windows)",
            a.verdict.as_deref().unwrap_or("-"),
            a.failures
        );
    }
    let n = &status.nodes;
    let _ = writeln!(
        w,
        "└── nodes: {} selected, {} warm, {} failed, {} reporting",
        n.selected, n.warmed, n.failed, n.reporting
    );
    let mine: Vec<_> = reports
        .iter()
        .filter_map(|r| {
            let k = r
                .spec
                .kernels
                .iter()
                .find(|k| k.namespace == ns && k.name == name)?;
            Some((r, k))
        })
        .collect();
    for (i, (r, k)) in mine.iter().enumerate() {
        let branch = if i + 1 == mine.len() {
            "└──"
        } else {
            "├──"
        };
        let current = if k.epoch == Some(status.step_epoch) {
            ""
        } else {
            " (previous step)"
        };
        let diff = k
            .shadow
            .max_numeric_diff
            .map_or_else(String::new, |d| format!(", max diff {d:.1e}"));
        let _ = writeln!(
            w,
            "    {branch} {}  {}  {}% canary{current}: canary {} ops ({} failed), stable {} ops ({} failed), {} shadow pairs{diff}",
            r.spec.node_name,
            k.state,
            k.traffic_percent,
            k.canary.ops,
            k.canary.failures,
            k.stable.ops,
            k.stable.failures,
            k.shadow.pairs,
        );
    }
    out
}

/// A fresh id for an action annotation.
pub fn action_id() -> String {
    Timestamp::now().as_millisecond().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kd(status: serde_json::Value) -> KernelDeployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment",
            "metadata": {"name": "conv", "namespace": "ml"},
            "spec": {"kernel": {"artifact": {"url": "file:///k", "sha256": "ab".repeat(32)},
                                "conv2d": {"inChannels": 1, "outChannels": 1, "kernelSize": [1, 1]}},
                     "nodeSelector": {}, "rollout": {"steps": [{"trafficPercent": 10, "pause": "30s"}, {"trafficPercent": 100}]}},
            "status": status
        }))
        .unwrap()
    }

    #[test]
    fn the_tree_marks_done_current_and_pending_steps_and_lists_nodes() {
        let rev = |a: bool| serde_json::json!({"artifact": {"url": "file:///k", "sha256": "ab".repeat(32)}, "flags": {"asyncEnabled": a}});
        let kd = kd(serde_json::json!({
            "phase": "Progressing", "currentStepIndex": 1, "trafficPercent": 100, "stepEpoch": 3,
            "stableRevision": rev(false), "canaryRevision": rev(true),
            "nodes": {"selected": 1, "warmed": 1, "failed": 0, "reporting": 1},
            "analysis": {"samples": 10, "failures": 0, "verdict": "Inconclusive: 10 of 100 canary samples"},
            "waitingSince": "2026-01-01T00:00:00Z", "progressDeadlineExceeded": true
        }));
        let report: NodeReport = serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "NodeReport", "metadata": {"name": "gpu-1"},
            "spec": {"nodeName": "gpu-1", "agentVersion": "0", "backend": "cpu", "heartbeatTime": "2026-01-01T00:00:00Z",
                     "kernels": [{"namespace": "ml", "name": "conv", "canarySha256": "ab".repeat(32), "state": "Warm",
                                  "epoch": 3, "trafficPercent": 100, "canary": {"trafficOps": 5, "ops": 7, "failures": 1, "fallbacks": 0, "latencySecondsSum": 0.1}}]}
        }))
        .unwrap();
        let text = render(&kd, &[report]);
        assert!(text.contains("│   ✔  10%  pause 30s"), "{text}");
        assert!(text.contains("│   ► 100%  until promoted"), "{text}");
        assert!(
            text.contains("stable: abababababab (sync, 4 streams)"),
            "{text}"
        );
        assert!(
            text.contains("canary: abababababab (async, 4 streams)"),
            "{text}"
        );
        assert!(text.contains("Inconclusive: 10 of 100"), "{text}");
        assert!(
            text.contains(
                "stalled: waiting on the nodes since 2026-01-01T00:00:00Z, past progressDeadline 600s"
            ),
            "{text}"
        );
        assert!(
            text.contains("└── gpu-1  Warm  100% canary: canary 7 ops (1 failed)"),
            "{text}"
        );
    }

    #[test]
    fn an_action_waits_for_the_one_pending() {
        let mut kd: KernelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment",
            "metadata": {"name": "k", "resourceVersion": "41"},
            "spec": {
                "kernel": {"artifact": {"url": "file:///k", "sha256": "a".repeat(64)},
                           "conv2d": {"inChannels": 2, "outChannels": 2, "kernelSize": [1, 1]}},
                "nodeSelector": {}, "rollout": {"steps": [{"trafficPercent": 100}]}
            }
        }))
        .unwrap();
        let patch = action_patch_for(&kd, ManualAction::Abort, "1").unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "41");
        assert_eq!(
            patch["metadata"]["annotations"]["kernelflow.dev/action"],
            "abort:1"
        );
        kd.annotations_mut()
            .insert(ACTION_ANNOTATION.into(), "abort:1".into());
        let e = action_patch_for(&kd, ManualAction::Promote, "2").unwrap_err();
        assert!(e.contains("\"abort:1\" is still pending"), "{e}");
        kd.status.get_or_insert_default().last_action = Some("abort:1".into());
        assert!(action_patch_for(&kd, ManualAction::Promote, "2").is_ok());
    }

    #[test]
    fn patches_say_what_a_user_would_write() {
        assert_eq!(
            action_patch(ManualAction::PromoteFull, "7"),
            serde_json::json!({"metadata": {"annotations": {"kernelflow.dev/action": "promote-full:7"}}})
        );
        assert_eq!(
            pause_patch(true),
            serde_json::json!({"spec": {"paused": true}})
        );
    }
}
