use k8s_openapi::jiff::SignedDuration;
use kernelflow_crds::kernel_deployment::NodeCounts;
use kernelflow_crds::node_report::{RevisionFigures, ShadowFigures};

use super::*;
use crate::nodes::Readiness;

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/// A spec with async on, the default 1/10/50/100 steps, `pause` at each and a 10 s interval.
fn spec(digest: &str, extra: serde_json::Value) -> KernelDeploymentSpec {
    let mut v = serde_json::json!({
        "kernel": {"artifact": {"url": format!("http://store/{digest}"), "sha256": digest},
                   "conv2d": {"inChannels": 1, "outChannels": 1, "kernelSize": [1, 1]}},
        "nodeSelector": {"matchLabels": {"gpu": "true"}},
        "flags": {"asyncEnabled": true},
        "rollout": {"steps": [{"trafficPercent": 1, "pause": "20s"}, {"trafficPercent": 10, "pause": "20s"},
                              {"trafficPercent": 50, "pause": "20s"}, {"trafficPercent": 100, "pause": "20s"}],
                    "analysis": {"interval": "10s", "minSamples": 100}}
    });
    kernelflow_crds::apply_merge_patch(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn nodes(reporting: u32, warmed: u32) -> Summary {
    Summary {
        counts: NodeCounts {
            selected: reporting,
            warmed,
            failed: 0,
            reporting,
        },
        readiness: Readiness {
            status: "Unknown",
            reason: "Warming".into(),
            message: String::new(),
        },
        unservable: false,
        epoch: 0,
        figures: BTreeMap::new(),
    }
}

/// One node's healthy figures: `samples` canary ops, none failing, canary as fast as stable,
/// equal outputs up to `diff`.
fn counted(samples: u64, diff: f64) -> Figures {
    Figures {
        nodes: 1,
        judges: 1,
        canary: RevisionFigures {
            ops: samples,
            latency_seconds_sum: samples as f64 * 1e-3,
            ..Default::default()
        },
        stable: RevisionFigures {
            ops: samples,
            latency_seconds_sum: samples as f64 * 1e-3,
            ..Default::default()
        },
        shadow: ShadowFigures {
            pairs: samples,
            canary_seconds_sum: 1.0,
            stable_seconds_sum: 1.0,
            comparable: true,
            max_numeric_diff: Some(diff),
        },
    }
}

/// What nodes counted since the call before, by name, as a summary of 3 warm nodes.
fn on(figures: &[(&str, Figures)]) -> Summary {
    let mut s = nodes(3, 3);
    s.figures = figures
        .iter()
        .map(|(node, figures)| {
            let figures = figures.clone();
            let n = NodeFigures {
                figures,
                since: None,
            };
            (node.to_string(), n)
        })
        .collect();
    s
}

/// Healthy figures on one node.
fn healthy(samples: u64, diff: f64) -> Summary {
    on(&[("n1", counted(samples, diff))])
}

/// The figures of the one node of `s`.
fn one(s: &mut Summary) -> &mut Figures {
    &mut s.figures.values_mut().next().unwrap().figures
}

/// Figures that fail analysis: 5% of 1000 canary operations failed.
fn failing() -> Summary {
    with_failures(1000, 50)
}

/// Drives the machine through time, keeping the status between calls as the API would, and
/// the nodes' counts as agents do: each call's figures are what each node counted since the
/// call before, added to its step's; a node a call leaves out stays as it was.
struct Run {
    spec: KernelDeploymentSpec,
    status: KernelDeploymentStatus,
    now: Timestamp,
    notes: Vec<Note>,
    last: Option<Decision>,
    /// The step's epoch and what each node counted in it.
    counted: (u64, BTreeMap<String, NodeFigures>),
}

/// `a` and then `b`: counts and seconds summed, the largest difference kept, the rest `b`'s.
fn plus(a: &Figures, b: &Figures) -> Figures {
    Figures {
        canary: a.canary.plus(&b.canary),
        stable: a.stable.plus(&b.stable),
        shadow: ShadowFigures {
            comparable: b.shadow.comparable,
            ..a.shadow.plus(&b.shadow)
        },
        ..b.clone()
    }
}

impl Run {
    fn new(spec: KernelDeploymentSpec) -> Self {
        Self {
            spec,
            status: KernelDeploymentStatus::default(),
            now: Timestamp::from_second(1_800_000_000).unwrap(),
            notes: Vec::new(),
            last: None,
            counted: (0, BTreeMap::new()),
        }
    }

    fn at(&mut self, secs: i64, summary: &Summary) -> &Decision {
        self.act(secs, summary, None)
    }

    fn act(&mut self, secs: i64, summary: &Summary, action: Option<&str>) -> &Decision {
        self.after(SignedDuration::from_secs(secs), summary, action)
    }

    fn after(
        &mut self,
        elapsed: SignedDuration,
        summary: &Summary,
        action: Option<&str>,
    ) -> &Decision {
        self.now += elapsed;
        // The nodes have caught up with the status's split, and count from its start.
        let epoch = self.status.step_epoch;
        if self.counted.0 != epoch {
            self.counted = (epoch, BTreeMap::new());
        }
        for (node, n) in &summary.figures {
            let counted = self.counted.1.entry(node.clone()).or_insert(NodeFigures {
                figures: Figures::default(),
                since: None,
            });
            counted.figures = plus(&counted.figures, &n.figures);
        }
        let summary = &Summary {
            epoch,
            figures: self.counted.1.clone(),
            ..summary.clone()
        };
        let action = action.map(|v| (v, ManualAction::parse(v).unwrap()));
        let d = decide(
            &self.spec,
            &self.status,
            &Observations {
                now: self.now,
                summary,
                action,
            },
        );
        // Through JSON, as the API keeps it: times to the second.
        self.status = serde_json::from_value(serde_json::to_value(&d.status).unwrap()).unwrap();
        self.notes.extend(d.notes.clone());
        self.last.insert(d)
    }

    fn phase(&self) -> RolloutPhase {
        self.status.phase
    }

    fn step(&self) -> (Option<u32>, u8) {
        (self.status.current_step_index, self.status.traffic_percent)
    }

    fn reasons(&self) -> Vec<&'static str> {
        self.notes.iter().map(|n| n.reason).collect()
    }
}

/// Warms and walks a run through all four steps with passing figures.
fn walk_to_healthy(run: &mut Run) {
    run.at(0, &nodes(3, 0));
    assert_eq!(run.phase(), RolloutPhase::Warming);
    run.at(1, &nodes(3, 3));
    for (i, pct) in [1u8, 10, 50, 100].into_iter().enumerate() {
        assert_eq!(run.step(), (Some(i as u32), pct));
        // Passing before the pause has run does not advance.
        run.at(10, &healthy(500, 0.0));
        assert_eq!(
            run.step(),
            (Some(i as u32), pct),
            "advanced before the pause"
        );
        run.at(10, &healthy(500, 0.0));
    }
}

#[test]
fn a_first_revision_turns_async_on_step_by_step_over_the_sync_baseline() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    run.at(0, &nodes(3, 0));
    let baseline = run.status.stable_revision.clone().unwrap();
    assert_eq!(baseline.artifact.sha256, A);
    assert!(
        !baseline.flags.async_enabled,
        "the baseline is the sync path"
    );
    assert!(
        run.status
            .canary_revision
            .as_ref()
            .unwrap()
            .flags
            .async_enabled
    );
    assert_eq!(run.status.traffic_percent, 0, "no traffic before warm");

    let mut epochs = vec![run.status.step_epoch];
    run.at(1, &nodes(3, 3));
    epochs.push(run.status.step_epoch);
    for _ in 0..4 {
        run.at(10, &healthy(500, 0.0));
        run.at(10, &healthy(500, 0.0));
        epochs.push(run.status.step_epoch);
    }
    assert!(
        epochs.windows(2).all(|w| w[1] > w[0]),
        "every split change is a new epoch: {epochs:?}"
    );
    assert_eq!(run.phase(), RolloutPhase::Healthy);
    assert_eq!(run.step(), (None, 100), "no step runs once it is done");
    assert_eq!(run.status.step_start_time, None);
    assert!(run.status.canary_revision.is_none());
    assert!(
        run.status
            .stable_revision
            .as_ref()
            .unwrap()
            .flags
            .async_enabled
    );
    assert_eq!(
        run.reasons(),
        [
            "StepStarted",
            "StepStarted",
            "StepStarted",
            "StepStarted",
            "RolloutCompleted"
        ]
    );
    let (outcome, took) = run.last.as_ref().unwrap().finished.unwrap();
    assert_eq!((outcome, took), (Outcome::Healthy, Duration::from_secs(81)));
    assert_eq!(
        run.last.as_ref().unwrap().requeue,
        None,
        "nothing left to time"
    );
}

#[test]
fn a_new_artifact_then_rolls_out_over_the_healthy_revision() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    walk_to_healthy(&mut run);
    let stable = run.status.stable_revision.clone().unwrap();
    run.spec = spec(B, serde_json::json!({}));
    run.at(1, &nodes(3, 0));
    assert_eq!(run.phase(), RolloutPhase::Warming);
    assert_eq!(run.status.stable_revision.as_ref(), Some(&stable));
    assert_eq!(
        run.status.canary_revision.as_ref().unwrap().artifact.sha256,
        B
    );
    walk_to_healthy(&mut run);
    assert_eq!(run.phase(), RolloutPhase::Healthy);
    assert_eq!(
        run.status.stable_revision.as_ref().unwrap().artifact.sha256,
        B
    );
}

#[test]
fn a_first_revision_already_on_the_sync_path_has_nothing_to_roll_out() {
    let mut run = Run::new(spec(
        A,
        serde_json::json!({"flags": {"asyncEnabled": false}}),
    ));
    run.at(0, &nodes(2, 1));
    assert_eq!(run.phase(), RolloutPhase::Warming);
    assert!(run.status.canary_revision.is_none());
    run.at(1, &nodes(2, 2));
    assert_eq!(
        (run.phase(), run.status.traffic_percent),
        (RolloutPhase::Healthy, 100)
    );
}

#[test]
fn no_reporting_node_means_pending() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    let d = run.at(0, &nodes(0, 0));
    assert_eq!(d.status.phase, RolloutPhase::Pending);
    assert_eq!(d.requeue, Some(WARMING_WAIT));
}

#[test]
fn too_few_samples_or_no_stable_latency_never_pass() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    run.at(60, &healthy(99, 0.0));
    assert_eq!(run.step(), (Some(0), 1), "99 of 100 samples");
    assert!(matches!(
        run.last.as_ref().unwrap().verdict,
        Some(Verdict::Inconclusive(_))
    ));

    let mut run = Run::new(spec(A, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    let mut no_stable = healthy(500, 0.0);
    one(&mut no_stable).shadow = ShadowFigures {
        comparable: false,
        ..Default::default()
    };
    one(&mut no_stable).stable = RevisionFigures::default();
    run.at(60, &no_stable);
    assert_eq!(run.step(), (Some(0), 1));
    let recorded = run.status.analysis.as_ref().unwrap();
    assert_eq!(recorded.overhead_ratio, None, "no division by zero");
    assert!(
        recorded
            .verdict
            .as_ref()
            .unwrap()
            .starts_with("Inconclusive"),
        "{recorded:?}"
    );
    assert_eq!(recorded.failures, 0);
}

#[test]
fn failing_analysis_counts_once_per_interval_then_rolls_back_naming_the_figure() {
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    let bad = failing();
    for _ in 0..5 {
        run.at(1, &bad);
    }
    assert_eq!(
        run.status.analysis.as_ref().unwrap().failures,
        1,
        "five looks in one interval"
    );
    run.at(10, &bad);
    assert_eq!(run.phase(), RolloutPhase::Progressing);
    run.at(10, &bad);
    assert_eq!(run.phase(), RolloutPhase::RolledBack);
    assert_eq!(run.status.traffic_percent, 0);
    let note = run.notes.last().unwrap();
    assert_eq!((note.warning, note.reason), (true, "RolledBack"));
    assert!(
        note.message
            .contains("success rate 0.9500 is under minSuccessRate 0.999"),
        "{note:?}"
    );
    assert!(note.message.contains("failed 3 times at 1%"), "{note:?}");
    assert_eq!(
        run.last.as_ref().unwrap().finished.unwrap().0,
        Outcome::RolledBack
    );
    assert_eq!(
        run.last.as_ref().unwrap().verdict.as_ref().unwrap().label(),
        "fail"
    );

    // Rolled back stays rolled back, whatever the figures say.
    run.at(100, &healthy(1000, 0.0));
    assert_eq!(run.phase(), RolloutPhase::RolledBack);
}

/// `samples` canary operations of which `failures` failed, the rest healthy.
fn with_failures(samples: u64, failures: u64) -> Summary {
    let mut s = healthy(samples, 0.0);
    one(&mut s).canary.failures = failures;
    s
}

/// A run warm and at a first step of 1% whose pause (5 min) outlasts many windows.
fn long_first_step() -> Run {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"steps": [
        {"trafficPercent": 1, "pause": "5m"}, {"trafficPercent": 100}]}}),
    ));
    run.at(0, &nodes(3, 3));
    run
}

/// Each window is judged on its own operations: one transient failure fails one window,
/// not every window until enough successes dilute it.
#[test]
fn one_failure_fails_one_window_only() {
    let mut run = long_first_step();
    run.at(10, &with_failures(100, 1));
    assert_eq!(run.status.analysis.as_ref().unwrap().failures, 1);
    for _ in 0..10 {
        run.at(10, &with_failures(300, 0));
    }
    let analysis = run.status.analysis.as_ref().unwrap();
    assert_eq!(analysis.failures, 1, "{analysis:?}");
    assert_eq!(run.phase(), RolloutPhase::Progressing);
}

/// A canary that starts failing late in a long step is not hidden by its early successes.
#[test]
fn late_failures_are_not_diluted_by_the_step_s_early_successes() {
    let mut run = long_first_step();
    for _ in 0..5 {
        run.at(10, &with_failures(10_000, 0));
    }
    // 5% of these fail: over the step, 50 of 51,000 would pass 0.999.
    for _ in 0..3 {
        run.at(10, &with_failures(1000, 50));
    }
    assert_eq!(
        run.phase(),
        RolloutPhase::RolledBack,
        "{:?}",
        run.status.analysis
    );
}

/// Right after a passed window closes, the next has nothing yet: the pass stands, and the
/// status and the Events stay as they are.
#[test]
fn a_pass_stands_while_the_next_window_fills() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"steps": [
        {"trafficPercent": 1}, {"trafficPercent": 100}]}}),
    ));
    run.at(0, &nodes(3, 3));
    run.at(10, &healthy(500, 0.0));
    assert_eq!(run.phase(), RolloutPhase::Paused, "awaiting a promote");
    let (before, notes) = (run.status.clone(), run.notes.len());
    run.at(0, &healthy(0, 0.0));
    assert_eq!(run.status, before);
    run.at(3, &healthy(10, 0.0));
    assert_eq!(run.phase(), RolloutPhase::Paused);
    assert_eq!(run.notes.len(), notes, "{:?}", run.reasons());
    assert_eq!(
        run.last.as_ref().unwrap().verdict.as_ref().unwrap().label(),
        "pass"
    );
}

/// A node whose counts fall (its agent restarted and counts afresh) has all it counted since
/// counted: nothing twice, and nothing underflows.
#[test]
fn counts_that_fall_are_counted_afresh() {
    let mut run = long_first_step();
    run.at(5, &with_failures(1000, 50));
    assert_eq!(run.status.analysis.as_ref().unwrap().failures, 1);
    run.counted.1 = with_failures(10, 0).figures;
    run.at(20, &healthy(0, 0.0));
    let analysis = run.status.analysis.as_ref().unwrap();
    assert_eq!(
        (analysis.samples, analysis.failures),
        (10, 1),
        "{analysis:?}"
    );
    run.at(5, &with_failures(200, 0));
    assert_eq!(run.status.analysis.as_ref().unwrap().samples, 210);
}

/// A node that goes quiet after a failed window and comes back brings only what it counted
/// since: the failures already counted do not fail another window.
#[test]
fn a_node_back_from_silence_is_not_judged_twice() {
    let mut run = long_first_step();
    let mut bad = counted(1000, 0.0);
    bad.canary.failures = 50;
    run.at(5, &on(&[("n1", counted(1000, 0.0)), ("n2", bad)]));
    assert_eq!(run.status.analysis.as_ref().unwrap().failures, 1);
    // n2 reports nothing new: its last word stands.
    for _ in 0..3 {
        run.at(10, &on(&[("n1", counted(300, 0.0))]));
    }
    run.at(
        10,
        &on(&[("n1", counted(300, 0.0)), ("n2", counted(500, 0.0))]),
    );
    let analysis = run.status.analysis.as_ref().unwrap();
    assert_eq!(analysis.failures, 1, "{analysis:?}");
    assert_eq!(analysis.nodes, 2);
    assert_eq!(run.phase(), RolloutPhase::Progressing);
}

/// A window kept as sums by an older operator opens anew on the counts of now.
#[test]
fn a_window_of_sums_from_an_older_operator_opens_anew() {
    let mut run = long_first_step();
    run.at(5, &with_failures(1000, 50));
    let mut analysis = serde_json::to_value(run.status.analysis.as_ref().unwrap()).unwrap();
    analysis["window"] = serde_json::json!({"time": "2027-01-15T08:00:05Z",
        "canary": {"trafficOps": 0, "ops": 0, "failures": 0, "fallbacks": 0, "latencySecondsSum": 0.0}});
    run.status.analysis = Some(serde_json::from_value(analysis).unwrap());
    run.at(20, &healthy(0, 0.0));
    let analysis = run.status.analysis.as_ref().unwrap();
    assert_eq!(
        (analysis.samples, analysis.failures),
        (0, 1),
        "{analysis:?}"
    );
    let window = analysis.window.as_ref().unwrap();
    assert_eq!(window.nodes.as_ref().unwrap()["n1"].canary.ops, 1000);
}

#[test]
fn a_failure_late_in_a_second_counts_once_a_whole_interval() {
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    let bad = failing();
    let ms = SignedDuration::from_millis;
    run.after(ms(900), &bad, None);
    // 9.1 s later: a whole interval after the second the status kept, not after the failure.
    run.after(ms(9100), &bad, None);
    assert_eq!(run.status.analysis.as_ref().unwrap().failures, 1);
    run.after(ms(1000), &bad, None);
    assert_eq!(run.status.analysis.as_ref().unwrap().failures, 2);
}

#[test]
fn no_samples_never_pass_whatever_min_samples_says() {
    let spec = AnalysisSpec {
        min_samples: 0,
        ..AnalysisSpec::default()
    };
    let (verdict, _) = analyse(&spec, &Figures::default());
    assert_eq!(verdict.kind(), "Inconclusive");
}

#[test]
fn without_auto_rollback_it_holds_as_degraded_until_told() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"autoRollback": false, "analysis": {"failureLimit": 1}}}),
    ));
    run.at(0, &nodes(3, 3));
    let mut slow = healthy(1000, 0.0);
    one(&mut slow).shadow.canary_seconds_sum = 2.0;
    run.at(10, &slow);
    assert_eq!(run.phase(), RolloutPhase::Degraded);
    assert_eq!(run.step(), (Some(0), 1), "traffic held at the step");
    assert!(
        run.notes
            .last()
            .unwrap()
            .message
            .contains("overhead ratio 2.000 is over maxOverheadRatio 1.1")
    );
    run.at(100, &healthy(1000, 0.0));
    assert_eq!(run.phase(), RolloutPhase::Degraded, "waits for a decision");
    run.act(1, &healthy(1000, 0.0), Some("promote:1"));
    assert_eq!(
        (run.phase(), run.step()),
        (RolloutPhase::Progressing, (Some(1), 10))
    );
}

#[test]
fn abort_and_retry() {
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    run.at(10, &healthy(500, 0.0));
    run.at(10, &healthy(500, 0.0));
    assert_eq!(run.step(), (Some(1), 10));
    run.act(1, &healthy(500, 0.0), Some("abort:1"));
    assert_eq!(
        (run.phase(), run.status.traffic_percent),
        (RolloutPhase::RolledBack, 0)
    );
    assert_eq!(
        run.last.as_ref().unwrap().finished.unwrap().0,
        Outcome::Aborted
    );
    assert_eq!(run.notes.last().unwrap().reason, "Aborted");

    run.act(1, &nodes(3, 2), Some("retry:2"));
    assert_eq!(
        run.phase(),
        RolloutPhase::Warming,
        "a node lost the canary meanwhile"
    );
    run.at(1, &nodes(3, 3));
    assert_eq!(
        run.step(),
        (Some(0), 1),
        "a retry starts from the first step"
    );
}

#[test]
fn each_action_value_acts_once() {
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    run.act(1, &nodes(3, 3), Some("promote:7"));
    assert_eq!(run.step(), (Some(1), 10));
    // The annotation is still there at the next reconcile (and after an operator restart).
    run.act(1, &nodes(3, 3), Some("promote:7"));
    assert_eq!(run.step(), (Some(1), 10));
    run.act(1, &nodes(3, 3), Some("promote:8"));
    assert_eq!(run.step(), (Some(2), 50));
    run.act(1, &nodes(3, 3), Some("promote-full:9"));
    assert_eq!(
        (run.phase(), run.status.traffic_percent),
        (RolloutPhase::Healthy, 100)
    );
    run.act(1, &nodes(3, 3), Some("abort:10"));
    assert_eq!(run.phase(), RolloutPhase::Healthy);
    assert_eq!(run.notes.last().unwrap().reason, "ActionIgnored");
}

#[test]
fn an_indefinite_pause_waits_for_promote() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"steps": [{"trafficPercent": 10}, {"trafficPercent": 100, "pause": "1s"}]}}),
    ));
    run.at(0, &nodes(3, 3));
    run.at(10, &healthy(500, 0.0));
    assert_eq!(
        (run.phase(), run.step()),
        (RolloutPhase::Paused, (Some(0), 10))
    );
    run.at(1000, &healthy(500, 0.0));
    assert_eq!(
        (run.phase(), run.step()),
        (RolloutPhase::Paused, (Some(0), 10))
    );
    assert_eq!(
        run.reasons()
            .iter()
            .filter(|r| **r == "AwaitingPromotion")
            .count(),
        1
    );
    run.act(1, &healthy(500, 0.0), Some("promote"));
    assert_eq!(run.step(), (Some(1), 100));
    run.at(1, &healthy(500, 0.0));
    assert_eq!(run.phase(), RolloutPhase::Healthy);
}

#[test]
fn spec_paused_holds_the_step_and_resuming_continues() {
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    run.spec.paused = true;
    run.at(100, &healthy(500, 0.0));
    assert_eq!(
        (run.phase(), run.step()),
        (RolloutPhase::Paused, (Some(0), 1))
    );
    run.spec.paused = false;
    run.at(1, &healthy(500, 0.0));
    assert_eq!(
        (run.phase(), run.step()),
        (RolloutPhase::Progressing, (Some(1), 10))
    );
}

/// Paused holds the step, not the analysis: a canary failing while paused is rolled back.
#[test]
fn a_paused_rollout_still_rolls_back_a_failing_canary() {
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    run.spec.paused = true;
    for _ in 0..2 {
        run.at(10, &failing());
        assert_eq!(run.phase(), RolloutPhase::Paused);
    }
    run.at(10, &failing());
    assert_eq!(run.phase(), RolloutPhase::RolledBack);
}

/// A step index means another step once the steps' traffic changes: the rollout starts
/// again at the first. A changed pause alone changes nothing.
#[test]
fn changed_steps_start_the_rollout_again_at_the_first() {
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    run.at(10, &healthy(500, 0.0));
    run.at(10, &healthy(500, 0.0));
    assert_eq!(run.step(), (Some(1), 10));
    run.spec.rollout.steps[1].pause = Some("1h".parse().unwrap());
    run.at(1, &healthy(500, 0.0));
    assert_eq!(run.step(), (Some(1), 10));
    let epoch = run.status.step_epoch;
    let steps = serde_json::json!({"rollout": {"steps": [{"trafficPercent": 5, "pause": "20s"},
        {"trafficPercent": 50, "pause": "20s"}, {"trafficPercent": 100}]}});
    run.spec = spec(B, steps);
    run.at(1, &healthy(500, 0.0));
    assert_eq!(run.step(), (Some(0), 5));
    assert!(run.status.step_epoch > epoch, "a new split");
    assert_eq!(run.reasons().last(), Some(&"StepStarted"));
    assert!(run.reasons().contains(&"StepsChanged"));
}

#[test]
fn a_new_digest_mid_rollout_restarts_against_the_last_healthy_revision() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    walk_to_healthy(&mut run);
    let healthy_rev = run.status.stable_revision.clone();
    run.spec = spec(B, serde_json::json!({}));
    run.at(1, &nodes(3, 3));
    run.at(10, &healthy(500, 0.0));
    run.at(10, &healthy(500, 0.0));
    assert_eq!(run.step(), (Some(1), 10));
    let c = "c".repeat(64);
    run.spec = spec(&c, serde_json::json!({}));
    run.at(1, &nodes(3, 0));
    assert_eq!(
        (run.phase(), run.status.traffic_percent),
        (RolloutPhase::Warming, 0)
    );
    assert_eq!(run.status.stable_revision, healthy_rev);
    assert_eq!(
        run.status.canary_revision.as_ref().unwrap().artifact.sha256,
        c
    );
    assert!(
        run.notes
            .last()
            .unwrap()
            .message
            .contains("replaces the rollout in progress")
    );
    run.at(1, &nodes(3, 3));
    assert_eq!(run.step(), (Some(0), 1));
}

#[test]
fn going_back_to_the_stable_spec_cancels_the_rollout() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    walk_to_healthy(&mut run);
    run.spec = spec(B, serde_json::json!({}));
    run.at(1, &nodes(3, 3));
    assert_eq!(run.step(), (Some(0), 1));
    run.spec = spec(A, serde_json::json!({}));
    run.at(1, &nodes(3, 3));
    assert_eq!(
        (run.phase(), run.status.traffic_percent),
        (RolloutPhase::Healthy, 100)
    );
    assert!(run.status.canary_revision.is_none());
    assert_eq!(run.notes.last().unwrap().reason, "RolloutCancelled");
}

#[test]
fn an_artifact_no_node_can_serve_fails_and_leaves_traffic_on_stable() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    walk_to_healthy(&mut run);
    run.spec = spec(B, serde_json::json!({}));
    let mut broken = nodes(3, 0);
    broken.unservable = true;
    broken.readiness.message = "node a: DigestMismatch".into();
    run.at(1, &broken);
    assert_eq!(
        (run.phase(), run.status.traffic_percent),
        (RolloutPhase::Failed, 0)
    );
    let message = &run.notes.last().unwrap().message;
    assert!(message.contains("DigestMismatch"), "{message}");
    assert!(
        message.contains("the stable revision keeps all traffic"),
        "{message}"
    );
    assert_eq!(
        run.status.stable_revision.as_ref().unwrap().artifact.sha256,
        A
    );
}

/// A first revision's baseline is the same artifact, so when it cannot be served nothing
/// can, and the message must not promise a stable revision.
#[test]
fn a_first_artifact_no_node_can_serve_says_nothing_serves() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    let mut broken = nodes(3, 0);
    broken.unservable = true;
    broken.readiness.message = "node a: NonFinite".into();
    run.at(0, &broken);
    assert_eq!(run.phase(), RolloutPhase::Failed);
    let message = &run.notes.last().unwrap().message;
    assert!(message.contains("nothing serves"), "{message}");
}

#[test]
fn after_a_first_artifact_nothing_could_serve_the_next_rolls_out_over_its_own_baseline() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    let mut broken = nodes(3, 0);
    broken.unservable = true;
    run.at(0, &broken);
    assert_eq!(
        (run.phase(), run.status.stable_revision.as_ref()),
        (RolloutPhase::Failed, None)
    );
    // The same revision is not tried again on its own.
    let notes = run.notes.len();
    run.at(5, &broken);
    assert_eq!(
        (run.phase(), run.notes.len()),
        (RolloutPhase::Failed, notes)
    );
    run.spec = spec(B, serde_json::json!({}));
    run.at(1, &nodes(3, 3));
    assert_eq!(
        run.status.stable_revision,
        Some(Revision::of(&run.spec).baseline())
    );
    assert_eq!(
        (run.phase(), run.step()),
        (RolloutPhase::Progressing, (Some(0), 1))
    );
}

#[test]
fn a_first_synchronous_revision_nothing_can_serve_waits_for_a_retry() {
    let mut run = Run::new(spec(
        A,
        serde_json::json!({"flags": {"asyncEnabled": false}}),
    ));
    let mut broken = nodes(3, 0);
    broken.unservable = true;
    run.at(0, &broken);
    assert_eq!(run.phase(), RolloutPhase::Failed);
    let message = run.status.message.as_deref().unwrap_or_default();
    assert!(
        message.ends_with("nothing serves until a servable artifact is set"),
        "{message}"
    );
    let (status, notes) = (run.status.clone(), run.notes.len());
    run.at(5, &broken);
    assert_eq!((&run.status, run.notes.len()), (&status, notes));
    run.act(1, &nodes(3, 0), Some("retry:1"));
    assert_eq!(run.phase(), RolloutPhase::Warming);
}

#[test]
fn abort_while_no_node_reports_rolls_back_for_good() {
    let mut run = Run::new(spec(A, serde_json::json!({})));
    walk_to_healthy(&mut run);
    run.spec = spec(B, serde_json::json!({}));
    run.at(1, &nodes(0, 0));
    assert_eq!(run.phase(), RolloutPhase::Pending);
    run.act(1, &nodes(0, 0), Some("abort:1"));
    assert_eq!(run.phase(), RolloutPhase::RolledBack);
    run.at(1, &nodes(3, 3));
    assert_eq!(
        (run.phase(), run.status.traffic_percent),
        (RolloutPhase::RolledBack, 0)
    );
}

#[test]
fn a_rollout_paused_before_its_first_step_warms_but_takes_no_traffic() {
    let mut run = Run::new(spec(A, serde_json::json!({"paused": true})));
    run.at(0, &nodes(3, 3));
    assert_eq!(
        (run.phase(), run.step()),
        (RolloutPhase::Warming, (None, 0))
    );
    let message = run.status.message.clone().unwrap_or_default();
    assert!(
        message.contains("paused before its first step"),
        "{message}"
    );
    run.spec.paused = false;
    run.at(1, &nodes(3, 3));
    assert_eq!(
        (run.phase(), run.step()),
        (RolloutPhase::Progressing, (Some(0), 1))
    );
}

#[test]
fn deciding_again_on_the_same_inputs_changes_nothing() {
    // What an operator restarted mid-rollout does: it reads the status and decides again.
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    run.at(10, &healthy(500, 0.0));
    run.at(10, &healthy(500, 0.0));
    run.at(1, &healthy(500, 0.0));
    let before = run.status.clone();
    let notes = run.notes.len();
    run.at(0, &healthy(0, 0.0));
    assert_eq!(
        run.status, before,
        "nothing to write: no step skipped or repeated"
    );
    assert_eq!(run.notes.len(), notes);
    // A new interval records the new figures: the open window's, since the step began.
    run.at(10, &healthy(502, 0.0));
    assert_eq!(run.status.analysis.as_ref().unwrap().samples, 1002);
}

fn figures(failures: u64, canary_seconds: f64, diff: Option<f64>, comparable: bool) -> Figures {
    let mut f = counted(1000, 0.0);
    f.canary.failures = failures;
    f.shadow.canary_seconds_sum = canary_seconds;
    f.shadow.max_numeric_diff = diff;
    f.shadow.comparable = comparable;
    f
}

#[test]
fn analysis_verdicts() {
    let spec = AnalysisSpec::default();
    let verdict = |f: Figures| analyse(&spec, &f).0;
    assert!(matches!(
        verdict(figures(0, 1.0, Some(0.0), true)),
        Verdict::Passed(_)
    ));
    assert!(
        matches!(
            verdict(figures(1, 1.0, Some(0.0), true)),
            Verdict::Passed(_)
        ),
        "0.999 is enough"
    );
    assert!(
        matches!(verdict(figures(2, 1.0, Some(0.0), true)), Verdict::Failed(m) if m.contains("success rate"))
    );
    // Operations the synchronous path rescued were failures of the canary's own path.
    let mut rescued = figures(0, 1.0, Some(0.0), true);
    rescued.canary.fallbacks = 2;
    assert!(matches!(verdict(rescued), Verdict::Failed(m) if m.contains("success rate 0.9980")));
    assert!(
        matches!(verdict(figures(0, 1.2, Some(0.0), true)), Verdict::Failed(m) if m.contains("overhead ratio 1.200"))
    );
    assert!(
        matches!(verdict(figures(0, 1.0, Some(1e-3), true)), Verdict::Failed(m) if m.contains("numeric difference 1e-3"))
    );
    assert!(
        matches!(verdict(figures(0, 1.0, Some(f64::NAN), true)), Verdict::Failed(m) if m.contains("NaN"))
    );
    assert!(
        matches!(verdict(figures(0, 1.0, None, true)), Verdict::Inconclusive(m) if m.contains("paired"))
    );
    let (v, recorded) = analyse(&spec, &figures(0, 1.0, Some(1.0), false));
    assert!(
        matches!(v, Verdict::Passed(m) if m.contains("not applicable")),
        "new weights differ by design"
    );
    assert_eq!(recorded.max_numeric_diff, None);
    // Every broken figure is named.
    assert!(
        matches!(verdict(figures(500, 5.0, Some(1.0), true)), Verdict::Failed(m) if m.matches(';').count() == 2)
    );
}

#[test]
fn overhead_falls_back_to_mean_latency_without_shadow_pairs() {
    let mut f = counted(1000, 0.0);
    f.shadow = ShadowFigures::default();
    f.canary.latency_seconds_sum = 3.0;
    f.stable.latency_seconds_sum = 2.0;
    assert_eq!(overhead(&f), Some(1.5));
    f.stable.latency_seconds_sum = 0.0;
    assert_eq!(overhead(&f), None);
}

#[test]
fn figures_of_the_split_a_promote_replaced_do_not_count_against_the_next_step() {
    let mut run = Run::new(spec(B, serde_json::json!({})));
    run.at(0, &nodes(3, 3));
    let mut bad = healthy(1000, 0.0);
    one(&mut bad).canary.failures = 500;
    run.act(1, &bad, Some("promote:1"));
    assert_eq!(run.step(), (Some(1), 10));
    let recorded = run.status.analysis.as_ref().unwrap();
    assert_eq!(
        (recorded.samples, recorded.failures),
        (0, 0),
        "{recorded:?}"
    );
}

/// A step that waits on its nodes for samples past `progressDeadline` is marked once, goes
/// on waiting, and is no longer marked once a window is judged.
#[test]
fn a_rollout_waiting_past_its_progress_deadline_is_marked_and_goes_on() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"progressDeadline": "1m"}}),
    ));
    run.at(0, &nodes(3, 3));
    for _ in 0..5 {
        run.at(10, &healthy(10, 0.0));
    }
    assert!(!run.status.progress_deadline_exceeded);
    run.at(10, &healthy(10, 0.0));
    run.at(10, &healthy(10, 0.0));
    assert!(run.status.progress_deadline_exceeded);
    assert_eq!(run.phase(), RolloutPhase::Progressing);
    let stalled: Vec<_> = run
        .notes
        .iter()
        .filter(|n| n.reason == "ProgressDeadlineExceeded")
        .collect();
    assert_eq!(stalled.len(), 1, "{:?}", run.reasons());
    assert!(stalled[0].warning);
    assert!(
        stalled[0].message.contains("60s") && stalled[0].message.contains("step 1 of 4"),
        "{}",
        stalled[0].message
    );
    run.at(10, &healthy(500, 0.0));
    assert!(!run.status.progress_deadline_exceeded);
    assert_eq!(run.status.waiting_since, None);
}

/// With `progressDeadlineAbort`, a canary that never warms everywhere is rolled back.
#[test]
fn a_canary_that_never_warms_is_rolled_back_at_the_deadline_with_abort() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"progressDeadline": "2m", "progressDeadlineAbort": true}}),
    ));
    run.at(0, &nodes(3, 2));
    run.at(119, &nodes(3, 2));
    assert_eq!(run.phase(), RolloutPhase::Warming);
    run.at(1, &nodes(3, 2));
    assert_eq!(run.phase(), RolloutPhase::RolledBack);
    assert_eq!(run.reasons().last(), Some(&"ProgressDeadlineExceeded"));
    assert_eq!(run.status.traffic_percent, 0);
    assert_eq!(
        run.last.as_ref().unwrap().finished.unwrap().0,
        Outcome::RolledBack
    );
}

/// Time paused does not count: a rollout resumed waits a whole deadline again.
#[test]
fn time_paused_does_not_count_against_the_progress_deadline() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"paused": true, "rollout": {"progressDeadline": "1m"}}),
    ));
    run.at(0, &nodes(3, 3));
    run.at(0, &nodes(3, 3));
    run.spec.paused = false;
    run.at(1, &nodes(3, 3));
    for _ in 0..4 {
        run.at(10, &healthy(1, 0.0));
    }
    assert!(run.status.waiting_since.is_some());
    run.spec.paused = true;
    run.at(10, &healthy(1, 0.0));
    assert_eq!(run.phase(), RolloutPhase::Paused);
    assert!(!run.status.progress_deadline_exceeded);
    assert_eq!(run.status.waiting_since, None);
    run.spec.paused = false;
    run.at(50, &healthy(1, 0.0));
    assert!(
        !run.status.progress_deadline_exceeded,
        "the wait began again"
    );
    assert_eq!(
        run.reasons()
            .iter()
            .filter(|r| **r == "ProgressDeadlineExceeded")
            .count(),
        0
    );
}

/// A deadline shorter than the analysis interval is looked at when it passes.
#[test]
fn the_machine_looks_again_when_the_deadline_passes() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"progressDeadline": "5s"}}),
    ));
    run.at(0, &nodes(3, 3));
    run.at(1, &healthy(10, 0.0));
    assert_eq!(
        run.last.as_ref().unwrap().requeue,
        Some(Duration::from_secs(5))
    );
    run.at(2, &healthy(10, 0.0));
    assert_eq!(
        run.last.as_ref().unwrap().requeue,
        Some(Duration::from_secs(3))
    );
}

/// A promote (or steps that changed) starts a step afresh: the wait of the step before does
/// not carry over.
#[test]
fn a_new_step_waits_a_whole_deadline_again() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"progressDeadline": "1m"}}),
    ));
    run.at(0, &nodes(3, 3));
    for _ in 0..5 {
        run.at(10, &healthy(10, 0.0));
    }
    run.act(0, &healthy(0, 0.0), Some("promote:1"));
    assert_eq!(run.step(), (Some(1), 10));
    for _ in 0..3 {
        run.at(10, &healthy(10, 0.0));
    }
    assert!(
        !run.status.progress_deadline_exceeded,
        "{:?}",
        run.status.waiting_since
    );
}

/// The mark follows the spec: turning abort on rolls a marked rollout back, and a deadline
/// raised past the wait takes the mark off.
#[test]
fn a_marked_rollout_follows_changes_to_its_deadline() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"progressDeadline": "1m"}}),
    ));
    run.at(0, &nodes(3, 3));
    for _ in 0..7 {
        run.at(10, &healthy(1, 0.0));
    }
    assert!(run.status.progress_deadline_exceeded);
    run.spec.rollout.progress_deadline = "1h".parse().unwrap();
    run.at(10, &healthy(1, 0.0));
    assert!(!run.status.progress_deadline_exceeded);
    run.spec.rollout.progress_deadline = "1m".parse().unwrap();
    run.at(10, &healthy(1, 0.0));
    assert!(run.status.progress_deadline_exceeded);
    run.spec.rollout.progress_deadline_abort = true;
    run.at(10, &healthy(1, 0.0));
    assert_eq!(run.phase(), RolloutPhase::RolledBack);
}

/// A step without a pause that has passed awaits its promote: thin traffic since does not
/// make it wait on its nodes, nor count against the deadline.
#[test]
fn a_passed_step_awaiting_its_promote_does_not_stall() {
    let mut run = Run::new(spec(
        B,
        serde_json::json!({"rollout": {"progressDeadline": "1m", "progressDeadlineAbort": true,
            "steps": [{"trafficPercent": 1}, {"trafficPercent": 100}]}}),
    ));
    run.at(0, &nodes(3, 3));
    run.at(10, &healthy(500, 0.0));
    assert_eq!(run.phase(), RolloutPhase::Paused);
    for _ in 0..30 {
        run.at(10, &healthy(0, 0.0));
    }
    assert_eq!(
        run.phase(),
        RolloutPhase::Paused,
        "{:?}",
        run.status.analysis
    );
    assert!(!run.status.progress_deadline_exceeded);
    // Failures still roll it back.
    for _ in 0..3 {
        run.at(10, &failing());
    }
    assert_eq!(run.phase(), RolloutPhase::RolledBack);
}

/// A first revision on the synchronous path has no canary to roll back: past its deadline
/// it is marked, never left rolled back with nothing to retry.
#[test]
fn without_a_canary_the_deadline_only_marks() {
    let mut run = Run::new(spec(
        A,
        serde_json::json!({"flags": {"asyncEnabled": false},
            "rollout": {"progressDeadline": "1m", "progressDeadlineAbort": true}}),
    ));
    run.at(0, &nodes(3, 2));
    assert!(run.status.canary_revision.is_none());
    run.at(61, &nodes(3, 2));
    assert_eq!(run.phase(), RolloutPhase::Warming);
    assert!(run.status.progress_deadline_exceeded);
    run.at(1, &nodes(3, 3));
    assert_eq!(run.phase(), RolloutPhase::Healthy);
    assert!(!run.status.progress_deadline_exceeded);
}
