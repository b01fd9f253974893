//! The rollout state machine: the spec, the current status, what the nodes report and the
//! time in; the new status and what happened out. No I/O, so that every path is driven by
//! unit tests, and an operator restarted mid-rollout resumes from the status alone.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::KernelDeploymentSpec;
use kernelflow_crds::kernel_deployment::{
    AnalysisFigures, AnalysisSpec, KernelDeploymentStatus, ManualAction, Revision, RolloutPhase,
    WindowStart,
};

use crate::nodes::{self, Figures, NodeFigures, Summary};

/// What the operator observed for one reconcile.
pub struct Observations<'a> {
    pub now: Timestamp,
    /// What the selected nodes report for the digest and epoch of the current status.
    pub summary: &'a Summary,
    /// The `kernelflow.dev/action` annotation: its value and the action it names.
    pub action: Option<(&'a str, ManualAction)>,
}

/// How a finished rollout ended, for the duration metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Healthy,
    RolledBack,
    Aborted,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Healthy => "healthy",
            Outcome::RolledBack => "rolled_back",
            Outcome::Aborted => "aborted",
        }
    }
}

/// An analysis verdict, with the figures that decided it.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Not enough data: wait, never pass.
    Inconclusive(String),
    Failed(String),
    Passed(String),
}

impl Verdict {
    pub fn label(&self) -> &'static str {
        match self {
            Verdict::Inconclusive(_) => "inconclusive",
            Verdict::Failed(_) => "fail",
            Verdict::Passed(_) => "pass",
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Verdict::Inconclusive(_) => "Inconclusive",
            Verdict::Failed(_) => "Failed",
            Verdict::Passed(_) => "Passed",
        }
    }

    fn describe(&self) -> String {
        let (Verdict::Inconclusive(m) | Verdict::Failed(m) | Verdict::Passed(m)) = self;
        format!("{}: {m}", self.kind())
    }
}

/// Something worth an Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The machine's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: KernelDeploymentStatus,
    pub notes: Vec<Note>,
    /// The analysis run in this reconcile, if any.
    pub verdict: Option<Verdict>,
    /// A rollout that ended in this reconcile, and how long it took.
    pub finished: Option<(Outcome, Duration)>,
    /// When to look again without an event; None waits for a change.
    pub requeue: Option<Duration>,
}

/// Bounds how long the machine sleeps while something time-driven is pending.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// How often to look while nodes warm (their reports also wake the controller).
const WARMING_WAIT: Duration = Duration::from_secs(10);

struct Machine<'a> {
    spec: &'a KernelDeploymentSpec,
    now: Timestamp,
    s: KernelDeploymentStatus,
    notes: Vec<Note>,
    verdict: Option<Verdict>,
    finished: Option<(Outcome, Duration)>,
    requeue: Option<Duration>,
}

/// One step of the machine.
pub fn decide(
    spec: &KernelDeploymentSpec,
    status: &KernelDeploymentStatus,
    obs: &Observations,
) -> Decision {
    let mut m = Machine {
        spec,
        now: obs.now,
        s: status.clone(),
        notes: Vec::new(),
        verdict: None,
        finished: None,
        requeue: None,
    };
    m.s.nodes = obs.summary.counts.clone();
    m.follow_spec();
    if let Some((value, action)) = obs.action
        && m.s.last_action.as_deref() != Some(value)
    {
        m.s.last_action = Some(value.to_string());
        m.manual(action);
    }
    m.progress(obs.summary);
    m.watch_progress();
    m.s.message = Some(m.summary_message());
    Decision {
        status: m.s,
        notes: m.notes,
        verdict: m.verdict,
        finished: m.finished,
        requeue: m.requeue,
    }
}

impl Machine<'_> {
    fn note(&mut self, warning: bool, reason: &'static str, message: String) {
        self.notes.push(Note {
            warning,
            reason,
            message,
        });
    }

    fn wait(&mut self, d: Duration) {
        let d = d.clamp(Duration::from_secs(1), MAX_WAIT);
        self.requeue = Some(self.requeue.map_or(d, |r| r.min(d)));
    }

    /// Now, rounded up to the second that the API keeps of a time: an interval measured from
    /// it is never cut short by the round trip (a pause, or a failure counted once a window).
    fn stored_now(&self) -> Time {
        let second = self.now.as_second() + i64::from(self.now.subsec_nanosecond() > 0);
        Time(Timestamp::from_second(second).unwrap_or(self.now))
    }

    fn since(&self, t: &Option<Time>) -> Duration {
        t.as_ref()
            .and_then(|t| Duration::try_from(self.now.duration_since(t.0)).ok())
            .unwrap_or_default()
    }

    /// Starts a rollout when the spec names a revision that is neither stable nor canary.
    fn follow_spec(&mut self) {
        let desired = Revision::of(self.spec);
        let Some(stable) = self.s.stable_revision.clone() else {
            // A first revision (or one after a first that nothing could serve, which waits
            // for another).
            if self.s.canary_revision.as_ref() != Some(&desired) {
                self.start(desired);
            }
            return;
        };
        if stable == desired {
            if self.s.canary_revision.take().is_some() {
                self.note(
                    false,
                    "RolloutCancelled",
                    "the spec is back at the stable revision; it takes all traffic".into(),
                );
                self.s.phase = RolloutPhase::Healthy;
                self.s.traffic_percent = 100;
                self.s.step_epoch += 1;
                self.s.step_traffic.clear();
                self.s.analysis = None;
            }
            return;
        }
        if self.s.canary_revision.as_ref() == Some(&desired) {
            self.follow_steps();
            return;
        }
        let interrupted = matches!(
            self.s.phase,
            RolloutPhase::Warming | RolloutPhase::Progressing | RolloutPhase::Paused
        );
        self.note(
            false,
            "RolloutStarted",
            format!(
                "new revision {}{} against stable {}",
                describe(&desired),
                if interrupted {
                    " (replaces the rollout in progress)"
                } else {
                    ""
                },
                describe(&stable)
            ),
        );
        self.start(desired);
    }

    /// The spec's steps' traffic percents.
    fn step_traffic(&self) -> Vec<u8> {
        let steps = &self.spec.rollout.steps;
        steps.iter().map(|s| s.traffic_percent).collect()
    }

    /// Starts again at the first step when the steps' traffic changed under a rollout in
    /// progress: its step index would now mean another step.
    fn follow_steps(&mut self) {
        use RolloutPhase::*;
        let traffic = self.step_traffic();
        // Degraded holds for a user's promote, abort or retry, whatever the steps say.
        if !matches!(self.s.phase, Progressing | Paused) || self.s.step_traffic == traffic {
            return;
        }
        // A status from before the steps were kept: they are taken as they are.
        if self.s.step_traffic.is_empty() {
            self.s.step_traffic = traffic;
            return;
        }
        self.note(
            false,
            "StepsChanged",
            format!(
                "the steps changed from {:?} to {traffic:?}% under the rollout; it starts again at the first",
                self.s.step_traffic
            ),
        );
        self.enter_step(0);
    }

    /// A new canary: it warms first and takes no traffic until it is warm everywhere.
    fn start(&mut self, canary: Revision) {
        // With no stable revision, the baseline is the same artifact on the synchronous path.
        let stable = self
            .s
            .stable_revision
            .get_or_insert_with(|| canary.baseline());
        let same = *stable == canary;
        self.s.canary_revision = (!same).then_some(canary);
        self.s.phase = RolloutPhase::Warming;
        self.s.current_step_index = None;
        self.s.traffic_percent = 0;
        self.s.step_epoch += 1;
        self.s.step_start_time = None;
        self.s.step_traffic.clear();
        self.s.rollout_start_time = Some(Time(self.now));
        self.s.analysis = None;
        self.end_wait();
    }

    fn manual(&mut self, action: ManualAction) {
        use RolloutPhase::*;
        let rolling = self.s.canary_revision.is_some();
        match (action, self.s.phase) {
            (ManualAction::Abort, Pending | Warming | Progressing | Paused | Degraded)
                if rolling =>
            {
                self.roll_back(Outcome::Aborted, "Aborted", "aborted by a user".into());
            }
            (ManualAction::Retry, RolledBack | Degraded | Failed) if rolling => {
                let canary = self.s.canary_revision.clone().expect("rolling");
                self.note(false, "Retried", format!("retrying {}", describe(&canary)));
                self.start(canary);
            }
            (ManualAction::Promote, Progressing | Paused | Degraded) => {
                self.note(false, "Promoted", "promoted past the current step".into());
                self.advance();
            }
            (ManualAction::PromoteFull, Progressing | Paused | Degraded) => {
                self.note(false, "Promoted", "promoted to 100%".into());
                self.complete();
            }
            (action, phase) => self.note(
                true,
                "ActionIgnored",
                format!("{} does nothing in phase {phase:?}", action.verb()),
            ),
        }
    }

    fn progress(&mut self, summary: &Summary) {
        use RolloutPhase::*;
        match self.s.phase {
            Pending | Warming => self.warm(summary),
            Progressing | Paused => {
                let was = self.s.phase;
                self.s.phase = Progressing;
                // Figures of another epoch belong to a split this reconcile just replaced.
                let none = BTreeMap::new();
                let figures = if summary.epoch == self.s.step_epoch {
                    &summary.figures
                } else {
                    &none
                };
                self.analyse(figures, was);
                // Paused holds the step, not the analysis: a canary failing while paused is
                // still rolled back.
                if self.spec.paused && self.s.phase == Progressing {
                    self.s.phase = Paused;
                }
            }
            Healthy | Degraded | RolledBack | Failed => {}
        }
    }

    fn warm(&mut self, summary: &Summary) {
        let counts = &summary.counts;
        if summary.unservable {
            self.s.phase = RolloutPhase::Failed;
            self.s.traffic_percent = 0;
            // A first revision's baseline is the same artifact: then nothing can serve.
            let fallback = self
                .s
                .stable_revision
                .as_ref()
                .filter(|s| s.artifact.sha256 != self.spec.kernel.artifact.sha256);
            let then = if fallback.is_some() {
                "the stable revision keeps all traffic"
            } else {
                // The stable revision has the same artifact, so it cannot serve either: the
                // next revision rolls out as a first one, over its own baseline. This one stays
                // on record (as the canary, even a synchronous one) so that it is not started
                // again on its own, and `retry` can.
                self.s.stable_revision = None;
                self.s
                    .canary_revision
                    .get_or_insert_with(|| Revision::of(self.spec));
                "nothing serves until a servable artifact is set"
            };
            self.note(
                true,
                "RolloutFailed",
                format!(
                    "the revision cannot be served, {then}: {}",
                    summary.readiness.message
                ),
            );
            return;
        }
        if counts.reporting == 0 || counts.warmed < counts.reporting {
            self.s.phase = if counts.reporting == 0 {
                RolloutPhase::Pending
            } else {
                RolloutPhase::Warming
            };
            self.wait(WARMING_WAIT);
            return;
        }
        if self.s.canary_revision.is_none() {
            self.s.phase = RolloutPhase::Healthy;
            self.s.traffic_percent = 100;
            self.note(
                false,
                "RolloutCompleted",
                format!("serving on {} nodes", counts.warmed),
            );
            return;
        }
        // Paused before its first step: warm, and no traffic until resumed.
        if !self.spec.paused {
            self.enter_step(0);
        }
    }

    fn enter_step(&mut self, index: usize) {
        let step = &self.spec.rollout.steps[index];
        self.s.phase = RolloutPhase::Progressing;
        self.s.current_step_index = Some(index as u32);
        self.s.traffic_percent = step.traffic_percent;
        self.s.step_traffic = self.step_traffic();
        self.s.step_epoch += 1;
        self.s.step_start_time = Some(self.stored_now());
        self.s.analysis = None;
        self.end_wait();
        self.note(
            false,
            "StepStarted",
            format!(
                "step {} of {}: {}% of conv2d operations on the canary",
                index + 1,
                self.spec.rollout.steps.len(),
                step.traffic_percent
            ),
        );
        self.wait(self.spec.rollout.analysis.interval.into());
    }

    fn advance(&mut self) {
        let next = self.s.current_step_index.map_or(0, |i| i as usize + 1);
        if next < self.spec.rollout.steps.len() {
            self.enter_step(next);
        } else {
            self.complete();
        }
    }

    fn complete(&mut self) {
        let Some(canary) = self.s.canary_revision.take() else {
            return;
        };
        self.note(
            false,
            "RolloutCompleted",
            format!("{} takes all traffic", describe(&canary)),
        );
        self.s.stable_revision = Some(canary);
        self.s.current_step_index = None;
        self.s.step_start_time = None;
        self.s.step_traffic.clear();
        self.end_window();
        self.s.phase = RolloutPhase::Healthy;
        self.s.traffic_percent = 100;
        self.s.step_epoch += 1;
        self.finished = Some((Outcome::Healthy, self.since(&self.s.rollout_start_time)));
    }

    fn roll_back(&mut self, outcome: Outcome, reason: &'static str, message: String) {
        self.s.phase = RolloutPhase::RolledBack;
        self.s.traffic_percent = 0;
        self.s.step_epoch += 1;
        self.s.step_traffic.clear();
        self.end_window();
        self.note(true, reason, message);
        self.finished = Some((outcome, self.since(&self.s.rollout_start_time)));
    }

    /// Keeps the last analysis on record, without a window: none is open once a rollout ends.
    fn end_window(&mut self) {
        if let Some(a) = &mut self.s.analysis {
            a.window = None;
        }
    }

    /// Runs analysis on the open window, and advances, waits, or fails.
    ///
    /// Agents count from the step's start; a window is what each node counted since it
    /// opened, so that each is judged on its own operations. A failed window is counted once and
    /// closes; a passed one closes after an interval; an inconclusive one stays open until
    /// it has its samples. (Numeric agreement is the step's largest difference throughout.)
    fn analyse(&mut self, figures: &BTreeMap<String, NodeFigures>, was: RolloutPhase) {
        let spec = &self.spec.rollout.analysis;
        let interval: Duration = spec.interval.into();
        let index = self.s.current_step_index.unwrap_or_default() as usize;
        let step = &self.spec.rollout.steps[index.min(self.spec.rollout.steps.len() - 1)];
        let previous = self.s.analysis.take().unwrap_or_default();
        let (opened, starts) = match previous.window.clone() {
            Some(WindowStart {
                time,
                nodes: Some(starts),
            }) => (time, starts),
            // Kept as sums over nodes by an older operator: a window opens on the counts now.
            Some(WindowStart { nodes: None, .. }) => (self.stored_now(), nodes::starts(figures)),
            None => {
                let time = self.s.step_start_time.clone();
                (time.unwrap_or_else(|| self.stored_now()), BTreeMap::new())
            }
        };
        let window = nodes::window(figures, &starts);
        let age = self.since(&Some(opened.clone()));
        let comparable = window.shadow.comparable;
        let (mut verdict, mut recorded) = analyse(spec, &window);
        // A window younger than an interval that cannot be judged yet leaves the pass of the
        // one before it standing: else every close would flip the verdict, and a step
        // without a pause in and out of waiting for its promote.
        let passed = previous
            .verdict
            .as_deref()
            .and_then(|v| v.strip_prefix("Passed: "));
        if let (Verdict::Inconclusive(_), Some(passed)) = (&verdict, passed)
            && age < interval
        {
            verdict = Verdict::Passed(passed.to_string());
            recorded = previous.clone();
        }
        // Within an interval the status keeps its figures while the verdict holds, so that
        // a stream of node reports does not become a stream of status writes.
        let same_kind = previous
            .verdict
            .as_deref()
            .and_then(|v| v.split(':').next())
            == Some(verdict.kind());
        if same_kind && previous.time.is_some() && self.since(&previous.time) < interval {
            recorded = previous;
        } else {
            recorded.failures = previous.failures;
            recorded.last_failure_time = previous.last_failure_time;
            recorded.passed_time = previous
                .passed_time
                .or_else(|| matches!(verdict, Verdict::Passed(_)).then(|| self.stored_now()));
            recorded.time = Some(Time(self.now));
            recorded.verdict = Some(verdict.describe());
            recorded.numeric_agreement = Some(
                if comparable {
                    "Checked"
                } else {
                    "NotApplicable: canary and stable do not compute the same function (new weights)"
                }
                .into(),
            );
        }
        // The next window starts from here.
        let close = |m: &Self, recorded: &mut AnalysisFigures| {
            recorded.window = Some(WindowStart {
                time: m.stored_now(),
                nodes: Some(nodes::starts(figures)),
            });
        };
        recorded.window = Some(WindowStart {
            time: opened,
            nodes: Some(starts.clone()),
        });
        match &verdict {
            Verdict::Failed(why) => {
                // A failing window counts once per interval, however often this runs.
                let due = recorded.last_failure_time.is_none()
                    || self.since(&recorded.last_failure_time) >= interval;
                if due {
                    close(self, &mut recorded);
                    recorded.failures += 1;
                    recorded.last_failure_time = Some(self.stored_now());
                    self.note(
                        true,
                        "AnalysisFailed",
                        format!(
                            "{why} ({} of {} failed windows)",
                            recorded.failures, spec.failure_limit
                        ),
                    );
                }
                let failures = recorded.failures;
                self.s.analysis = Some(recorded);
                if failures >= spec.failure_limit {
                    let message = format!(
                        "analysis failed {failures} times at {}%: {why}",
                        step.traffic_percent
                    );
                    if self.spec.rollout.auto_rollback {
                        self.roll_back(
                            Outcome::RolledBack,
                            "RolledBack",
                            format!("{message}; all traffic is back on the stable revision"),
                        );
                    } else {
                        self.s.phase = RolloutPhase::Degraded;
                        self.note(
                            true,
                            "Degraded",
                            format!("{message}; held at this step (autoRollback is off)"),
                        );
                    }
                } else {
                    self.wait(interval);
                }
            }
            Verdict::Inconclusive(_) => {
                // A step without a pause that has passed awaits its promote, whatever the
                // windows since say for want of samples.
                if step.pause.is_none() && recorded.passed_time.is_some() {
                    self.s.phase = RolloutPhase::Paused;
                }
                self.s.analysis = Some(recorded);
                self.wait(interval);
            }
            Verdict::Passed(_) => {
                if age >= interval {
                    close(self, &mut recorded);
                }
                self.s.analysis = Some(recorded);
                match step.pause {
                    _ if self.spec.paused => self.wait(interval),
                    None => {
                        if was != RolloutPhase::Paused {
                            self.note(
                                false,
                                "AwaitingPromotion",
                                "analysis passed; the step has no pause, so it waits for a promote"
                                    .into(),
                            );
                        }
                        self.s.phase = RolloutPhase::Paused;
                    }
                    Some(pause) => {
                        let pause: Duration = pause.into();
                        let elapsed = self.since(&self.s.step_start_time);
                        if elapsed >= pause {
                            self.advance();
                        } else {
                            self.wait(pause - elapsed);
                        }
                    }
                }
            }
        }
        self.verdict = Some(verdict);
    }

    /// Ends a wait on the nodes, and its mark: the rollout progressed, or is paused.
    fn end_wait(&mut self) {
        self.s.waiting_since = None;
        self.s.progress_deadline_exceeded = false;
    }

    /// Marks a rollout that has waited on its nodes (to warm, or for a window's samples)
    /// past `progressDeadline`, or rolls it back with `progressDeadlineAbort`. Any progress,
    /// or a pause, ends the wait.
    fn watch_progress(&mut self) {
        use RolloutPhase::*;
        let waiting = !self.spec.paused
            && match self.s.phase {
                Pending | Warming => true,
                Progressing => matches!(self.verdict, Some(Verdict::Inconclusive(_))),
                _ => false,
            };
        if !waiting {
            self.end_wait();
            return;
        }
        let since = match &self.s.waiting_since {
            Some(since) => since.clone(),
            None => self.s.waiting_since.insert(self.stored_now()).clone(),
        };
        let deadline = self.spec.rollout.progress_deadline;
        let (waited, limit) = (self.since(&Some(since)), Duration::from(deadline));
        if waited < limit {
            // Within a deadline raised since the mark, the mark comes off.
            self.s.progress_deadline_exceeded = false;
            self.wait(limit - waited);
            return;
        }
        let why = match &self.verdict {
            Some(Verdict::Inconclusive(why)) => format!(" ({why})"),
            _ => String::new(),
        };
        let message = format!(
            "no progress within progressDeadline {deadline}: {}{why}",
            self.summary_message()
        );
        // Only a canary rolls back: a first revision on the synchronous path has nothing to
        // roll out, nor a retry to start again.
        if self.spec.rollout.progress_deadline_abort && self.s.canary_revision.is_some() {
            self.end_wait();
            self.roll_back(
                Outcome::RolledBack,
                "ProgressDeadlineExceeded",
                format!("{message}; rolled back, all traffic is on the stable revision"),
            );
        } else if !self.s.progress_deadline_exceeded {
            self.s.progress_deadline_exceeded = true;
            self.note(
                true,
                "ProgressDeadlineExceeded",
                format!("{message}; still waiting"),
            );
        }
    }

    fn summary_message(&self) -> String {
        use RolloutPhase::*;
        let canary = self.s.canary_revision.as_ref().map(describe);
        match (self.s.phase, canary) {
            (Progressing | Paused | Degraded, Some(c)) => format!(
                "{c}: step {} of {} at {}%",
                self.s.current_step_index.unwrap_or_default() + 1,
                self.spec.rollout.steps.len(),
                self.s.traffic_percent
            ),
            (Warming, Some(c)) => format!(
                "{c}: warming on {} of {} nodes{}",
                self.s.nodes.warmed,
                self.s.nodes.reporting,
                if self.spec.paused {
                    " (paused before its first step)"
                } else {
                    ""
                }
            ),
            (RolledBack, Some(c)) => {
                format!("{c} rolled back; the stable revision takes all traffic")
            }
            (Failed, Some(c)) => match self.s.stable_revision {
                Some(_) => format!("{c} cannot be served; the stable revision takes all traffic"),
                None => {
                    format!("{c} cannot be served; nothing serves until a servable artifact is set")
                }
            },
            (Pending, _) => "waiting for a selected node with an agent reporting".into(),
            _ => match &self.s.stable_revision {
                Some(s) => format!("{} takes all traffic", describe(s)),
                None => String::new(),
            },
        }
    }
}

/// A revision in a line: the digest's first 12 digits and the async flag.
pub fn describe(r: &Revision) -> String {
    let digest = r.artifact.sha256.get(..12).unwrap_or(&r.artifact.sha256);
    format!(
        "{digest} ({}, {} streams)",
        if r.flags.async_enabled {
            "async"
        } else {
            "sync"
        },
        r.flags.stream_pool_size
    )
}

/// Judges one window's figures against the analysis spec. Too few samples, or nothing to
/// compare against, is inconclusive: it never passes on missing data or divides by zero.
pub fn analyse(spec: &AnalysisSpec, f: &Figures) -> (Verdict, AnalysisFigures) {
    let samples = f.canary.ops;
    // An async operation re-run on the synchronous path served its caller, but the canary's
    // own path failed it: analysis counts it as a failure.
    let failed = f
        .canary
        .failures
        .saturating_add(f.canary.fallbacks)
        .min(samples);
    let success_rate = (samples > 0).then(|| 1.0 - failed as f64 / samples as f64);
    let overhead_ratio = overhead(f);
    let max_numeric_diff = f
        .shadow
        .comparable
        .then_some(f.shadow.max_numeric_diff)
        .flatten();
    let figures = AnalysisFigures {
        samples,
        success_rate,
        overhead_ratio,
        max_numeric_diff,
        nodes: f.nodes,
        ..AnalysisFigures::default()
    };
    // No samples is never enough, whatever `minSamples` says (an object older than its minimum).
    if samples == 0 || samples < spec.min_samples {
        let why = format!("{samples} of {} canary samples", spec.min_samples);
        return (Verdict::Inconclusive(why), figures);
    }
    let mut broken = Vec::new();
    let rate = success_rate.expect("samples > 0");
    if rate < spec.min_success_rate {
        broken.push(format!(
            "success rate {rate:.4} is under minSuccessRate {}",
            spec.min_success_rate
        ));
    }
    // NaN breaks a limit too: `over` is true unless the figure is within it.
    let over = |v: f64, limit: f64| {
        use std::cmp::Ordering::{Equal, Less};
        !matches!(v.partial_cmp(&limit), Some(Less | Equal))
    };
    if let Some(ratio) = overhead_ratio.filter(|r| over(*r, spec.max_overhead_ratio)) {
        broken.push(format!(
            "overhead ratio {ratio:.3} is over maxOverheadRatio {}",
            spec.max_overhead_ratio
        ));
    }
    if let Some(diff) = max_numeric_diff.filter(|d| over(*d, spec.max_numeric_diff)) {
        broken.push(format!(
            "numeric difference {diff:e} is over maxNumericDiff {:e}",
            spec.max_numeric_diff
        ));
    }
    if !broken.is_empty() {
        return (Verdict::Failed(broken.join("; ")), figures);
    }
    let Some(ratio) = overhead_ratio else {
        let why = "no successful stable operations to compare latency with".into();
        return (Verdict::Inconclusive(why), figures);
    };
    if f.shadow.comparable && max_numeric_diff.is_none() {
        let why = "no paired outputs to compare yet".into();
        return (Verdict::Inconclusive(why), figures);
    }
    let numeric = max_numeric_diff.map_or_else(
        || "numeric agreement not applicable".to_string(),
        |d| format!("numeric difference {d:e}"),
    );
    let why =
        format!("{samples} samples, success rate {rate:.4}, overhead ratio {ratio:.3}, {numeric}");
    (Verdict::Passed(why), figures)
}

/// Canary latency over stable latency: from the shadow pairs (identical inputs, back to
/// back) when there are any, else from the mean latency of each revision's operations.
fn overhead(f: &Figures) -> Option<f64> {
    if f.shadow.pairs > 0 && f.shadow.stable_seconds_sum > 0.0 {
        return Some(f.shadow.canary_seconds_sum / f.shadow.stable_seconds_sum);
    }
    let mean = |r: &kernelflow_crds::node_report::RevisionFigures| {
        let ok = r.ops.saturating_sub(r.failures);
        (ok > 0 && r.latency_seconds_sum > 0.0).then(|| r.latency_seconds_sum / ok as f64)
    };
    Some(mean(&f.canary)? / mean(&f.stable)?)
}

#[cfg(test)]
mod tests;
