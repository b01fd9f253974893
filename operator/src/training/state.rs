//! The AsyncTrainingJob state machine, without I/O: the job (spec and current status), what
//! the nodes and their agents report, and the time go in; the new status, the Events to
//! publish, whether to delete the job and when to look again come out.
//!
//! The run policy follows Kubeflow's training operator: `backoffLimit` counts worker
//! restarts across all workers; `activeDeadlineSeconds` counts from the start (reset by a
//! suspension) and fails the job with `DeadlineExceeded`; `suspend` stops the workers at a
//! step boundary after a checkpoint and resuming continues from it; `ttlSecondsAfterFinished`
//! deletes the job that long after it succeeded or failed.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kernelflow_crds::AsyncTrainingJob;
use kernelflow_crds::node_report::WorkerReport;
use kernelflow_crds::training_job::{
    AsyncTrainingJobStatus, TrainingPhase, WorkerState, WorkerStatus,
};
use kernelflow_crds::validate;

use crate::controller::{accepted_at, condition_at};

/// Operator-wide settings of the state machine.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How long a node's agent may go without reporting before its workers are restarted
    /// elsewhere; also how fresh a report must be for a node to get workers.
    pub grace: Duration,
}

/// What the operator knows of one node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub name: String,
    /// Its labels match the job's `placement.nodeSelector`.
    pub selected: bool,
    /// Its agent reported within the grace period.
    pub reporting: bool,
    /// Workers of any job its agent reports: new workers go to the least busy nodes.
    pub workers: usize,
}

/// The world as the reconcile sees it.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    pub now: Timestamp,
    /// Every node.
    pub nodes: &'a [NodeView],
    /// The workers of this job (same uid) that agents report, with the reporting node.
    pub reports: &'a [(String, WorkerReport)],
}

/// An Event beyond the condition transitions (those are published from the conditions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    /// What the Event is about, as its `action`.
    pub action: &'static str,
    pub message: String,
}

/// What the reconcile is to do.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: AsyncTrainingJobStatus,
    pub notes: Vec<Note>,
    /// `ttlSecondsAfterFinished` has passed: delete the job.
    pub delete: bool,
    /// When to reconcile again without a change; `None` waits for one.
    pub requeue: Option<Duration>,
}

/// Shortest wait between reconciles of a running job.
const MIN_REQUEUE: Duration = Duration::from_millis(100);

/// Longest wait before looking for nodes again: new agents wake no job.
const NODE_POLL: Duration = Duration::from_secs(5);

/// How long a failed worker waits before its restart, after `restarts` restarts of its job:
/// 10 s, doubled each time, at most 6 min (a Job's pod backoff).
fn backoff(restarts: u32) -> Duration {
    let doubled = 10u64 << restarts.min(6);
    Duration::from_secs(doubled.min(360))
}

/// How long from `now` until `t`; zero once it has passed.
fn until(now: Timestamp, t: Timestamp) -> Duration {
    Duration::try_from(t.duration_since(now)).unwrap_or_default()
}

/// `s` seconds after `t`, or the end of time: a spec's limit of any size must not overflow.
fn after(t: Timestamp, s: u64) -> Timestamp {
    let s = SignedDuration::from_secs(i64::try_from(s).unwrap_or(i64::MAX));
    t.checked_add(s).unwrap_or(Timestamp::MAX)
}

/// Decides the next status of `job`.
pub fn decide(job: &AsyncTrainingJob, obs: &Observation<'_>, settings: &Settings) -> Decision {
    let old = job.status.clone().unwrap_or_default();
    let generation = job.metadata.generation;
    let mut m = Machine {
        spec: &job.spec,
        obs,
        grace: settings.grace,
        old: &old.conditions,
        generation,
        status: AsyncTrainingJobStatus {
            observed_generation: generation,
            ..old.clone()
        },
        notes: Vec::new(),
        backing_off: None,
    };
    let verdict = validate::stored_training_job(&job.spec);
    m.put(accepted_at(&verdict, generation, &old.conditions, obs.now));
    if verdict.is_err() {
        // Invalid specs wait for the user to change them.
        return m.done(None);
    }
    m.set(
        "Created",
        "True",
        "JobCreated",
        &format!(
            "the job is accepted; {} workers",
            job.spec.placement.replicas
        ),
    );
    if old.phase.is_finished() {
        return m.finished();
    }
    m.slots();
    m.fold_reports();
    if let Some((reason, message)) = m.deadline().or_else(|| m.restart_lost_and_failed()) {
        return m.fail(reason, &message);
    }
    m.place();
    m.phase()
}

struct Machine<'a> {
    spec: &'a kernelflow_crds::AsyncTrainingJobSpec,
    obs: &'a Observation<'a>,
    grace: Duration,
    old: &'a [Condition],
    generation: Option<i64>,
    status: AsyncTrainingJobStatus,
    notes: Vec<Note>,
    /// The soonest a failed worker's backoff ends.
    backing_off: Option<Duration>,
}

impl Machine<'_> {
    /// Sets condition `type_`, keeping its place and, while its status holds, its
    /// transition time.
    fn set(&mut self, type_: &str, status: &str, reason: &str, message: &str) {
        let c = condition_at(
            type_,
            status,
            reason,
            message,
            self.generation,
            self.old,
            self.obs.now,
        );
        self.put(c);
    }

    fn put(&mut self, c: Condition) {
        match self
            .status
            .conditions
            .iter_mut()
            .find(|o| o.type_ == c.type_)
        {
            Some(o) => *o = c,
            None => self.status.conditions.push(c),
        }
    }

    /// Sets a condition False, if it has ever applied.
    fn clear(&mut self, type_: &str, reason: &str, message: &str) {
        if self.status.conditions.iter().any(|c| c.type_ == type_) {
            self.set(type_, "False", reason, message);
        }
    }

    fn done(self, requeue: Option<Duration>) -> Decision {
        Decision {
            status: self.status,
            notes: self.notes,
            delete: false,
            requeue,
        }
    }

    /// A finished job only waits for its time to live.
    fn finished(mut self) -> Decision {
        let ttl = self.spec.run_policy.ttl_seconds_after_finished;
        let Some((ttl, done)) = ttl.zip(self.status.completion_time.clone()) else {
            return self.done(None);
        };
        let left = until(self.obs.now, after(done.0, ttl));
        if !left.is_zero() {
            return self.done(Some(left));
        }
        self.notes.push(Note {
            warning: false,
            reason: "Expired",
            action: "Delete",
            message: format!("deleting the job {ttl}s after it finished (ttlSecondsAfterFinished)"),
        });
        let mut d = self.done(None);
        d.delete = true;
        d
    }

    /// One slot per replica, in index order.
    fn slots(&mut self) {
        let old = std::mem::take(&mut self.status.workers);
        self.status.workers = (0..self.spec.placement.replicas)
            .map(|index| {
                old.iter()
                    .find(|w| w.index == index)
                    .cloned()
                    .unwrap_or(WorkerStatus {
                        index,
                        ..WorkerStatus::default()
                    })
            })
            .collect();
    }

    /// Takes the reports of the current assignments; a worker without one keeps what was
    /// last known of it.
    fn fold_reports(&mut self) {
        // A succeeded worker's result stands: a run of it started again (an agent that
        // restarted) must not take it back.
        for w in self
            .status
            .workers
            .iter_mut()
            .filter(|w| w.state != WorkerState::Succeeded)
        {
            let Some((_, r)) = self.obs.reports.iter().find(|(node, r)| {
                !w.node.is_empty()
                    && *node == w.node
                    && r.index == w.index
                    && r.attempt == w.attempt
            }) else {
                continue;
            };
            if r.state != WorkerState::Failed {
                w.failed_time = None;
            }
            w.state = r.state;
            w.step = r.step;
            w.samples_per_second = r.samples_per_second;
            w.first_loss = r.first_loss;
            w.last_loss = r.last_loss;
            // The agent's own once the run has resumed, from the checkpoint it found or
            // afresh (none on a new node's disk, or one refused): before, the last known.
            w.checkpoint_step = match r.state {
                WorkerState::Pending | WorkerState::Starting | WorkerState::Failed => {
                    r.checkpoint_step.or(w.checkpoint_step)
                }
                _ => r.checkpoint_step,
            };
            w.resumed_from_step = r.resumed_from_step;
            w.final_weights_sha256.clone_from(&r.final_weights_sha256);
            w.pipeline.clone_from(&r.pipeline);
            w.message = match (&r.reason, &r.message) {
                (Some(reason), Some(message)) => Some(format!("{reason}: {message}")),
                (_, message) => message.clone(),
            };
        }
    }

    /// Why the job fails when it has run longer than `activeDeadlineSeconds`.
    fn deadline(&self) -> Option<(&'static str, String)> {
        let limit = self.spec.run_policy.active_deadline_seconds?;
        let start = self.status.start_time.as_ref()?.0;
        if self.spec.run_policy.suspend || self.obs.now < after(start, limit) {
            return None;
        }
        Some((
            "DeadlineExceeded",
            format!("the job ran longer than activeDeadlineSeconds ({limit}s)"),
        ))
    }

    fn fail(mut self, reason: &str, message: &str) -> Decision {
        self.status.phase = TrainingPhase::Failed;
        self.status.completion_time = Some(Time(self.obs.now));
        self.set("Failed", "True", reason, message);
        self.clear("Running", reason, message);
        self.clear("Restarting", reason, message);
        self.summarize();
        self.finished()
    }

    /// Restarts workers whose node is gone or whose agent stopped reporting (elsewhere) and
    /// workers that failed (on their node), counting each against `backoffLimit`. Returns
    /// why the job fails instead: past the limit, or a failure no restart fixes.
    fn restart_lost_and_failed(&mut self) -> Option<(&'static str, String)> {
        let suspend = self.spec.run_policy.suspend;
        let limit = self.spec.run_policy.backoff_limit;
        let exceeded = |i: usize, node: &str, why: &str, restarts: u32| {
            (restarts >= limit).then(|| {
                let message = format!(
                    "worker {i} on node {node}: {why}; the job has used its backoffLimit of {limit} restarts"
                );
                ("BackoffLimitExceeded", message)
            })
        };
        for i in 0..self.status.workers.len() {
            let w = &self.status.workers[i];
            // A finished worker's weights are in its report: losing its node loses nothing.
            if w.node.is_empty() || w.state == WorkerState::Succeeded {
                continue;
            }
            let lost = match self.obs.nodes.iter().find(|n| n.name == w.node) {
                None => Some(format!("node {} is gone", w.node)),
                Some(n) if !n.reporting => Some(format!(
                    "the agent on node {} has not reported for over {}s",
                    w.node,
                    self.grace.as_secs()
                )),
                Some(_) => None,
            };
            let failed = w.state == WorkerState::Failed;
            let is_lost = lost.is_some();
            let why = match (lost, failed) {
                (Some(lost), _) => lost,
                (None, true) => {
                    let message = w.message.clone().unwrap_or_default();
                    let permanent = self.obs.reports.iter().any(|(node, r)| {
                        *node == w.node
                            && r.index == w.index
                            && r.attempt == w.attempt
                            && r.permanent
                    });
                    if permanent {
                        return Some((
                            "WorkerFailed",
                            format!("worker {i} on node {}: {message}", w.node),
                        ));
                    }
                    let why = format!("it failed: {message}");
                    // Past the limit, it fails the job now rather than after its backoff.
                    if let Some(exceeded) = exceeded(i, &w.node, &why, self.status.restarts) {
                        return Some(exceeded);
                    }
                    let now = self.obs.now;
                    let since = self.status.workers[i]
                        .failed_time
                        .get_or_insert(Time(now))
                        .0;
                    // Nothing restarts while suspended: it restarts once resumed.
                    if suspend {
                        continue;
                    }
                    let wait = backoff(self.status.restarts);
                    let left = until(now, after(since, wait.as_secs()));
                    if !left.is_zero() {
                        self.backing_off = Some(self.backing_off.map_or(left, |b| b.min(left)));
                        continue;
                    }
                    why
                }
                (None, false) => continue,
            };
            let w = &mut self.status.workers[i];
            if suspend && (!failed || is_lost) {
                // Nothing runs while suspended: the worker waits for a node when resumed.
                w.node.clear();
                w.state = WorkerState::Pending;
                continue;
            }
            if let Some(exceeded) = exceeded(i, &w.node, &why, self.status.restarts) {
                return Some(exceeded);
            }
            self.status.restarts += 1;
            // A failed worker restarts on its node; a lost one waits for another.
            let from = if failed && !is_lost {
                w.node.clone()
            } else {
                std::mem::take(&mut w.node)
            };
            w.attempt += 1;
            w.failed_time = None;
            w.state = WorkerState::Pending;
            w.samples_per_second = 0.0;
            w.pipeline = None;
            w.final_weights_sha256 = None;
            w.message = Some(format!("restarting from the last checkpoint: {why}"));
            self.notes.push(Note {
                warning: true,
                reason: "WorkerRestarted",
                action: "Restart",
                message: format!(
                    "worker {i} (on node {from}) restarts from its last checkpoint, restart {} of {limit}: {why}",
                    self.status.restarts
                ),
            });
        }
        None
    }

    /// Assigns workers without a node to selected nodes whose agents report, one worker of
    /// the job per node, least busy first.
    fn place(&mut self) {
        if self.spec.run_policy.suspend {
            return;
        }
        let taken: HashSet<String> = self.status.workers.iter().map(|w| w.node.clone()).collect();
        let mut candidates: Vec<&NodeView> = self
            .obs
            .nodes
            .iter()
            .filter(|n| n.selected && n.reporting && !taken.contains(&n.name))
            .collect();
        candidates.sort_by(|a, b| a.workers.cmp(&b.workers).then_with(|| a.name.cmp(&b.name)));
        let mut candidates = candidates.into_iter();
        for w in self.status.workers.iter_mut().filter(|w| w.node.is_empty()) {
            let Some(node) = candidates.next() else {
                break;
            };
            w.node.clone_from(&node.name);
            w.state = WorkerState::Pending;
            self.notes.push(Note {
                warning: false,
                reason: "WorkerPlaced",
                action: "Place",
                message: format!(
                    "worker {} on node {} (attempt {})",
                    w.index, node.name, w.attempt
                ),
            });
        }
    }

    /// The phase and conditions from where the workers stand; totals; when to look again.
    fn phase(mut self) -> Decision {
        let now = self.obs.now;
        let suspend = self.spec.run_policy.suspend;
        let workers = &self.status.workers;
        let all = workers.len();
        let placed = workers.iter().filter(|w| !w.node.is_empty()).count();
        let stopped = |w: &&WorkerStatus| {
            w.node.is_empty()
                || matches!(
                    w.state,
                    WorkerState::Pending | WorkerState::Suspended | WorkerState::Succeeded
                )
        };
        let running = workers
            .iter()
            .filter(|w| !stopped(w) && w.state != WorkerState::Failed)
            .count();
        // Failed ones wait out their backoff.
        let restarting = workers.iter().any(|w| {
            (w.attempt > 0 && w.state == WorkerState::Pending)
                || (!suspend && w.state == WorkerState::Failed)
        });
        let reported = placed == all && workers.iter().all(|w| w.state != WorkerState::Pending);

        if self.status.start_time.is_none() && !suspend {
            self.status.start_time = Some(Time(now));
        }
        if workers.iter().all(|w| w.state == WorkerState::Succeeded) {
            let message = format!(
                "all {all} workers finished their {} steps",
                self.spec.training.steps
            );
            self.status.phase = TrainingPhase::Succeeded;
            self.status.completion_time = Some(Time(now));
            self.set("Succeeded", "True", "JobSucceeded", &message);
            self.clear("Running", "JobSucceeded", &message);
            self.clear("Restarting", "JobSucceeded", &message);
            self.summarize();
            return self.finished();
        }
        if suspend && running == 0 {
            let message = "every worker stopped at a checkpoint";
            self.status.phase = TrainingPhase::Suspended;
            self.status.start_time = None;
            self.set("Suspended", "True", "JobSuspended", message);
            self.clear("Running", "JobSuspended", message);
            self.clear("Restarting", "JobSuspended", message);
            self.summarize();
            return self.done(None);
        }
        if suspend {
            self.set(
                "Suspended",
                "False",
                "Suspending",
                &format!("waiting for {running} workers to checkpoint and stop"),
            );
        } else if self
            .status
            .conditions
            .iter()
            .any(|c| c.type_ == "Suspended" && (c.status == "True" || c.reason == "Suspending"))
        {
            self.set(
                "Suspended",
                "False",
                "JobResumed",
                "the workers resume from their checkpoints",
            );
        }
        self.status.phase = if restarting {
            TrainingPhase::Restarting
        } else if reported {
            TrainingPhase::Running
        } else if self.status.phase == TrainingPhase::Created
            || (self.status.restarts == 0
                && !self.status.conditions.iter().any(|c| c.type_ == "Running"))
        {
            // Never ran (created suspended, say): nothing restarts.
            TrainingPhase::Created
        } else {
            TrainingPhase::Restarting
        };
        match self.status.phase {
            TrainingPhase::Running => {
                self.set(
                    "Running",
                    "True",
                    "JobRunning",
                    &format!("{all} workers placed and reporting"),
                );
                self.clear(
                    "Restarting",
                    "WorkersRunning",
                    "every worker is running again",
                );
            }
            TrainingPhase::Restarting => {
                let message = match self.waiting_for_nodes(placed) {
                    Some(m) => m,
                    None => "workers restart from their last checkpoints".into(),
                };
                self.set("Restarting", "True", "WorkerRestarting", &message);
                self.clear("Running", "WorkerRestarting", &message);
            }
            _ => {
                if let Some(message) = self.waiting_for_nodes(placed) {
                    self.set("Created", "True", "WaitingForNodes", &message);
                }
            }
        }
        self.summarize();
        let mut requeue = self.grace / 2;
        if placed < all {
            requeue = requeue.min(NODE_POLL);
        }
        if let (Some(limit), Some(start)) = (
            self.spec.run_policy.active_deadline_seconds,
            &self.status.start_time,
        ) {
            requeue = requeue.min(until(now, after(start.0, limit)));
        }
        if let Some(left) = self.backing_off {
            requeue = requeue.min(left);
        }
        self.done(Some(requeue.max(MIN_REQUEUE)))
    }

    /// Why workers have no node, when some lack one.
    fn waiting_for_nodes(&self, placed: usize) -> Option<String> {
        let all = self.status.workers.len();
        if placed == all {
            return None;
        }
        let selected = self.obs.nodes.iter().filter(|n| n.selected).count();
        let reporting = self
            .obs
            .nodes
            .iter()
            .filter(|n| n.selected && n.reporting)
            .count();
        Some(format!(
            "waiting for nodes: {placed} of {all} workers placed; {selected} nodes match spec.placement.nodeSelector, {reporting} of them with an agent reporting, each takes one worker"
        ))
    }

    /// Progress, throughput, overlap efficiency and loss over the workers.
    fn summarize(&mut self) {
        let w = &self.status.workers;
        let steps = self.spec.training.steps.max(1);
        let done: u64 = w.iter().map(|w| w.step.min(steps)).sum();
        let asked = steps * w.len().max(1) as u64;
        self.status.progress = Some(format!("{}%", done * 100 / asked));
        self.status.throughput = w
            .iter()
            .filter(|w| w.state == WorkerState::Running)
            .map(|w| w.samples_per_second)
            .sum();
        let mean = |values: Vec<f64>| {
            (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
        };
        self.status.overlap_efficiency = mean(
            w.iter()
                .filter_map(|w| w.pipeline.as_ref().map(|p| p.overlap_efficiency))
                .collect(),
        );
        self.status.last_loss = mean(w.iter().filter_map(|w| w.last_loss).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernelflow_crds::training_job::PipelineFigures;

    const GRACE: Duration = Duration::from_secs(30);

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn job(replicas: u32, run_policy: serde_json::Value) -> AsyncTrainingJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "AsyncTrainingJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1},
            "spec": {
                "model": {"layers": [{"name": "a", "conv2d": {"inChannels": 1, "outChannels": 1, "kernelSize": [1, 1]}}]},
                "data": {"synthetic": {"shape": [1, 2, 2], "samples": 8}},
                "training": {"batchSize": 2, "steps": 100, "learningRate": 0.1},
                "placement": {"nodeSelector": {"matchLabels": {"gpu": "true"}}, "replicas": replicas},
                "runPolicy": run_policy
            }
        }))
        .unwrap()
    }

    fn node(name: &str, selected: bool, reporting: bool, workers: usize) -> NodeView {
        NodeView {
            name: name.into(),
            selected,
            reporting,
            workers,
        }
    }

    fn report(
        node: &str,
        index: u32,
        attempt: u32,
        state: WorkerState,
        step: u64,
    ) -> (String, WorkerReport) {
        (
            node.into(),
            WorkerReport {
                namespace: "ns".into(),
                name: "j".into(),
                uid: "u".into(),
                index,
                attempt,
                state,
                step,
                samples_per_second: 10.0 * f64::from(index + 1),
                first_loss: Some(1.0),
                last_loss: Some(0.5 + f64::from(index) * 0.1),
                checkpoint_step: Some(step / 10 * 10),
                pipeline: Some(PipelineFigures {
                    overlap_efficiency: 0.8 + f64::from(index) * 0.1,
                    ..PipelineFigures::default()
                }),
                final_weights_sha256: (state == WorkerState::Succeeded).then(|| "d".repeat(64)),
                ..WorkerReport::default()
            },
        )
    }

    fn decide_at(
        job: &AsyncTrainingJob,
        nodes: &[NodeView],
        reports: &[(String, WorkerReport)],
        seconds: i64,
    ) -> Decision {
        let obs = Observation {
            now: at(seconds),
            nodes,
            reports,
        };
        decide(job, &obs, &Settings { grace: GRACE })
    }

    /// The job with the decision's status, as the next reconcile reads it.
    fn then(mut job: AsyncTrainingJob, d: &Decision) -> AsyncTrainingJob {
        job.status = Some(d.status.clone());
        job
    }

    fn condition(d: &Decision, type_: &str) -> Option<(String, String)> {
        d.status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status.clone(), c.reason.clone()))
    }

    /// The message of `d`'s condition `type_`.
    fn message<'a>(d: &'a Decision, type_: &str) -> &'a str {
        let c = d.status.conditions.iter().find(|c| c.type_ == type_);
        &c.expect("the condition is set").message
    }

    fn is(d: &Decision, type_: &str, status: &str, reason: &str) -> bool {
        condition(d, type_) == Some((status.into(), reason.into()))
    }

    fn assigned(d: &Decision) -> Vec<(&str, u32)> {
        d.status
            .workers
            .iter()
            .map(|w| (w.node.as_str(), w.attempt))
            .collect()
    }

    fn nodes() -> Vec<NodeView> {
        vec![
            node("a", true, true, 2),
            node("b", true, true, 0),
            node("c", true, false, 0),
            node("d", false, true, 0),
        ]
    }

    /// A job with two workers on `a` and `b`, both reporting `state` at step 50.
    fn running(
        run_policy: serde_json::Value,
        state: WorkerState,
    ) -> (AsyncTrainingJob, Vec<(String, WorkerReport)>) {
        let j = job(2, run_policy);
        let placed = decide_at(&j, &nodes(), &[], 0);
        let reports = vec![report("b", 0, 0, state, 50), report("a", 1, 0, state, 50)];
        let j = then(j, &placed);
        let d = decide_at(&j, &nodes(), &reports, 1);
        (then(j, &d), reports)
    }

    #[test]
    fn workers_go_to_distinct_selected_reporting_nodes_least_busy_first() {
        let d = decide_at(&job(2, serde_json::json!({})), &nodes(), &[], 0);
        assert_eq!(assigned(&d), [("b", 0), ("a", 0)]);
        assert_eq!(d.status.phase, TrainingPhase::Created);
        assert!(is(&d, "Accepted", "True", "Valid"));
        assert!(is(&d, "Created", "True", "JobCreated"));
        assert_eq!(d.status.start_time, Some(Time(at(0))));
        assert_eq!(d.status.observed_generation, Some(1));
        assert_eq!(d.notes.len(), 2);
        assert_eq!(d.notes[0].reason, "WorkerPlaced");
        assert_eq!(d.notes[0].message, "worker 0 on node b (attempt 0)");
        assert_eq!(d.requeue, Some(GRACE / 2));
    }

    #[test]
    fn workers_wait_for_nodes_with_a_message() {
        let d = decide_at(&job(3, serde_json::json!({})), &nodes(), &[], 0);
        assert_eq!(assigned(&d), [("b", 0), ("a", 0), ("", 0)]);
        assert!(is(&d, "Created", "True", "WaitingForNodes"));
        let message = &d.status.conditions[1].message;
        assert!(
            message.contains("2 of 3 workers placed; 3 nodes match"),
            "{message}"
        );
        assert!(
            message.contains("2 of them with an agent reporting"),
            "{message}"
        );
        assert_eq!(d.requeue, Some(NODE_POLL));
    }

    #[test]
    fn the_job_runs_once_every_worker_reports_and_totals_its_figures() {
        let (j, _) = running(serde_json::json!({}), WorkerState::Running);
        let s = j.status.as_ref().unwrap();
        assert_eq!(s.phase, TrainingPhase::Running);
        assert!(
            s.conditions
                .iter()
                .any(|c| c.type_ == "Running" && c.status == "True" && c.reason == "JobRunning")
        );
        assert_eq!(s.throughput, 30.0);
        assert!((s.overlap_efficiency.unwrap() - 0.85).abs() < 1e-9);
        assert!((s.last_loss.unwrap() - 0.55).abs() < 1e-9);
        assert_eq!(s.progress.as_deref(), Some("50%"));
        let w = &s.workers[1];
        assert_eq!(
            (w.step, w.checkpoint_step, w.state),
            (50, Some(50), WorkerState::Running)
        );
        assert_eq!(w.last_loss, Some(0.6));
    }

    /// A worker that starts afresh (its checkpoint on another node's disk, or refused) names
    /// no checkpoint once it runs; while it starts, the last one known stands.
    #[test]
    fn a_run_started_afresh_names_no_checkpoint() {
        let (j, _) = running(serde_json::json!({}), WorkerState::Running);
        let node = j.status.as_ref().unwrap().workers[1].node.clone();
        let attempt = j.status.as_ref().unwrap().workers[1].attempt;
        let mut starting = report(&node, 1, attempt, WorkerState::Starting, 0);
        starting.1.checkpoint_step = None;
        let d = decide_at(&j, &nodes(), &[starting], 2);
        assert_eq!(d.status.workers[1].checkpoint_step, Some(50));
        let mut afresh = report(&node, 1, attempt, WorkerState::Running, 3);
        afresh.1.checkpoint_step = None;
        let d = decide_at(&j, &nodes(), &[afresh], 2);
        assert_eq!(
            (
                d.status.workers[1].step,
                d.status.workers[1].checkpoint_step
            ),
            (3, None)
        );
    }

    #[test]
    fn reports_of_another_attempt_or_node_are_not_taken() {
        let j = job(1, serde_json::json!({}));
        let j = then(j.clone(), &decide_at(&j, &nodes(), &[], 0));
        let stale = [
            report("b", 0, 1, WorkerState::Running, 9),
            report("a", 0, 0, WorkerState::Running, 9),
        ];
        let d = decide_at(&j, &nodes(), &stale, 1);
        assert_eq!(
            (d.status.workers[0].state, d.status.workers[0].step),
            (WorkerState::Pending, 0)
        );
        assert_eq!(d.status.phase, TrainingPhase::Created);
    }

    #[test]
    fn the_job_succeeds_when_every_worker_did_and_goes_after_its_ttl() {
        let (j, _) = running(
            serde_json::json!({"ttlSecondsAfterFinished": 60}),
            WorkerState::Running,
        );
        let done = [
            report("b", 0, 0, WorkerState::Succeeded, 100),
            report("a", 1, 0, WorkerState::Succeeded, 100),
        ];
        let d = decide_at(&j, &nodes(), &done, 5);
        assert_eq!(d.status.phase, TrainingPhase::Succeeded);
        assert_eq!(d.status.completion_time, Some(Time(at(5))));
        assert!(is(&d, "Succeeded", "True", "JobSucceeded"));
        assert!(is(&d, "Running", "False", "JobSucceeded"));
        assert_eq!(d.status.progress.as_deref(), Some("100%"));
        assert_eq!(
            d.status.workers[0].final_weights_sha256,
            Some("d".repeat(64))
        );
        assert_eq!(d.requeue, Some(Duration::from_secs(60)));
        let j = then(j, &d);
        // Finished: reports no longer change it.
        let later = decide_at(&j, &nodes(), &[], 30);
        assert_eq!(
            (later.status.clone(), later.delete),
            (d.status.clone(), false)
        );
        assert_eq!(later.requeue, Some(Duration::from_secs(35)));
        let expired = decide_at(&j, &nodes(), &[], 65);
        assert!(expired.delete);
        assert_eq!(expired.notes[0].reason, "Expired");
        let mut no_ttl = j.clone();
        no_ttl.spec.run_policy.ttl_seconds_after_finished = None;
        assert_eq!(decide_at(&no_ttl, &nodes(), &[], 9999).requeue, None);
    }

    #[test]
    fn a_worker_whose_agent_went_quiet_or_node_went_away_restarts_elsewhere() {
        let (j, reports) = running(serde_json::json!({"backoffLimit": 3}), WorkerState::Running);
        let mut quiet = nodes();
        quiet[1].reporting = false; // b: quiet for over the grace period
        quiet.push(node("e", true, true, 0));
        let d = decide_at(&j, &quiet, &reports, 1);
        assert_eq!(assigned(&d), [("e", 1), ("a", 0)]);
        assert_eq!(d.status.restarts, 1);
        assert_eq!(d.status.phase, TrainingPhase::Restarting);
        assert!(is(&d, "Restarting", "True", "WorkerRestarting"));
        assert!(is(&d, "Running", "False", "WorkerRestarting"));
        let restarted = d
            .notes
            .iter()
            .find(|n| n.reason == "WorkerRestarted")
            .unwrap();
        assert!(restarted.warning);
        assert!(restarted.message.contains("worker 0 (on node b) restarts from its last checkpoint, restart 1 of 3: the agent on node b has not reported for over 30s"), "{}", restarted.message);
        assert_eq!(d.status.workers[0].step, 50, "progress so far is kept");

        // Back to Running once the new attempt reports.
        let j = then(j, &d);
        let back = [
            report("e", 0, 1, WorkerState::Starting, 50),
            report("a", 1, 0, WorkerState::Running, 60),
        ];
        let d = decide_at(&j, &quiet, &back, 2);
        assert_eq!(d.status.phase, TrainingPhase::Running);
        assert!(is(&d, "Restarting", "False", "WorkersRunning"));

        // A Node object that is gone counts at once.
        let j = then(j, &d);
        let gone: Vec<NodeView> = quiet.into_iter().filter(|n| n.name != "a").collect();
        let d = decide_at(&j, &gone, &back, 3);
        assert_eq!(d.status.restarts, 2);
        assert_eq!(assigned(&d)[1], ("", 1), "no other node: waits for one");
        assert_eq!(d.status.phase, TrainingPhase::Restarting);
        assert!(d.status.conditions.iter().any(|c| {
            c.message
                .contains("waiting for nodes: 1 of 2 workers placed")
        }));
    }

    #[test]
    fn a_failed_worker_restarts_on_its_node_unless_the_failure_is_permanent() {
        let (j, mut reports) = running(serde_json::json!({}), WorkerState::Running);
        reports[0].1.state = WorkerState::Failed;
        reports[0].1.reason = Some("ComputeFailed".into());
        reports[0].1.message = Some("stream fault".into());
        // It waits out its backoff first: 10 s after the operator saw it fail.
        let d = decide_at(&j, &nodes(), &reports, 2);
        assert_eq!(
            (assigned(&d), d.status.restarts, d.requeue),
            (vec![("b", 0), ("a", 0)], 0, Some(Duration::from_secs(10)))
        );
        assert_eq!(d.status.phase, TrainingPhase::Restarting, "not running");
        let waiting = then(j.clone(), &d);
        let d = decide_at(&waiting, &nodes(), &reports, 11);
        assert_eq!(
            (assigned(&d), d.status.restarts),
            (vec![("b", 0), ("a", 0)], 0)
        );
        let d = decide_at(&waiting, &nodes(), &reports, 12);
        assert_eq!(assigned(&d), [("b", 1), ("a", 0)]);
        assert_eq!(d.status.restarts, 1);
        assert_eq!(d.status.workers[0].failed_time, None);
        assert!(
            d.notes[0]
                .message
                .ends_with("it failed: ComputeFailed: stream fault"),
            "{}",
            d.notes[0].message
        );

        reports[0].1.permanent = true;
        reports[0].1.reason = Some("InvalidModel".into());
        let d = decide_at(&j, &nodes(), &reports, 2);
        assert_eq!(d.status.phase, TrainingPhase::Failed);
        assert!(is(&d, "Failed", "True", "WorkerFailed"));
        assert_eq!(d.status.restarts, 0);
        assert_eq!(
            message(&d, "Failed"),
            "worker 0 on node b: InvalidModel: stream fault"
        );
    }

    #[test]
    fn a_failed_worker_past_the_limit_fails_the_job_at_once() {
        let (j, mut reports) =
            running(serde_json::json!({"backoffLimit": 0}), WorkerState::Running);
        reports[0].1.state = WorkerState::Failed;
        let d = decide_at(&j, &nodes(), &reports, 2);
        assert!(is(&d, "Failed", "True", "BackoffLimitExceeded"));
    }

    #[test]
    fn a_failed_worker_neither_holds_up_a_suspension_nor_restarts_during_it() {
        let (mut j, mut reports) = running(serde_json::json!({}), WorkerState::Running);
        j.spec.run_policy.suspend = true;
        reports[0].1.state = WorkerState::Failed;
        reports[1].1.state = WorkerState::Suspended;
        let d = decide_at(&j, &nodes(), &reports, 100);
        assert_eq!(
            (d.status.phase, d.status.restarts),
            (TrainingPhase::Suspended, 0)
        );
        // Resumed after its backoff ran out: it restarts at once.
        let mut j = then(j, &d);
        j.spec.run_policy.suspend = false;
        let d = decide_at(&j, &nodes(), &reports, 200);
        assert_eq!((assigned(&d)[0], d.status.restarts), (("b", 1), 1));
    }

    #[test]
    fn a_worker_that_reports_again_after_failing_starts_its_next_backoff_afresh() {
        let (j, mut reports) = running(serde_json::json!({}), WorkerState::Running);
        reports[0].1.state = WorkerState::Failed;
        let j = then(j.clone(), &decide_at(&j, &nodes(), &reports, 2));
        assert!(j.status.as_ref().unwrap().workers[0].failed_time.is_some());
        reports[0].1.state = WorkerState::Running;
        let d = decide_at(&j, &nodes(), &reports, 3);
        assert_eq!(d.status.workers[0].failed_time, None);
    }

    #[test]
    fn a_job_that_restarted_a_worker_never_goes_back_to_created() {
        // Two workers, one node: worker 1 never finds one.
        let one = [node("b", true, true, 0)];
        let j = job(2, serde_json::json!({}));
        let j = then(j.clone(), &decide_at(&j, &one, &[], 0));
        let failed = [report("b", 0, 0, WorkerState::Failed, 5)];
        let j = then(j.clone(), &decide_at(&j, &one, &failed, 1));
        let d = decide_at(&j, &one, &failed, 20);
        assert_eq!((assigned(&d)[0], d.status.restarts), (("b", 1), 1));
        let back = [report("b", 0, 1, WorkerState::Running, 5)];
        let d = decide_at(&then(j, &d), &one, &back, 21);
        assert_eq!(d.status.phase, TrainingPhase::Restarting);
    }

    #[test]
    fn backoff_doubles_with_each_restart_up_to_six_minutes() {
        let waits: Vec<u64> = (0..9).map(|r| backoff(r).as_secs()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 360, 360, 360]);
        assert_eq!(backoff(u32::MAX).as_secs(), 360);
    }

    #[test]
    fn a_worker_that_failed_on_a_node_since_gone_restarts_elsewhere_once() {
        let (j, mut reports) = running(serde_json::json!({}), WorkerState::Running);
        reports[0].1.state = WorkerState::Failed;
        let j = then(j.clone(), &decide_at(&j, &nodes(), &reports, 2));
        let gone: Vec<NodeView> = nodes().into_iter().filter(|n| n.name != "b").collect();
        let d = decide_at(&j, &gone, &reports[1..], 3);
        assert_eq!(
            (assigned(&d)[0], d.status.restarts),
            (("", 1), 1),
            "not on the node that is gone"
        );
        let d = decide_at(&then(j, &d), &gone, &reports[1..], 4);
        assert_eq!(d.status.restarts, 1, "one loss, one restart");
    }

    #[test]
    fn a_succeeded_worker_keeps_its_result_when_a_new_run_of_it_reports() {
        let (j, _) = running(serde_json::json!({}), WorkerState::Running);
        let done = [
            report("b", 0, 0, WorkerState::Succeeded, 100),
            report("a", 1, 0, WorkerState::Running, 60),
        ];
        let j = then(j.clone(), &decide_at(&j, &nodes(), &done, 2));
        let again = [
            report("b", 0, 0, WorkerState::Running, 3),
            report("a", 1, 0, WorkerState::Running, 61),
        ];
        let w = &decide_at(&j, &nodes(), &again, 3).status.workers[0];
        assert_eq!((w.state, w.step), (WorkerState::Succeeded, 100));
        assert!(w.final_weights_sha256.is_some());
    }

    #[test]
    fn a_job_created_suspended_is_created_not_restarting_once_resumed() {
        let mut j = job(2, serde_json::json!({"suspend": true}));
        let d = decide_at(&j, &nodes(), &[], 0);
        assert_eq!(d.status.phase, TrainingPhase::Suspended);
        j = then(j, &d);
        j.spec.run_policy.suspend = false;
        let d = decide_at(&j, &nodes(), &[], 1);
        assert_eq!(d.status.phase, TrainingPhase::Created);
        assert_eq!(condition(&d, "Restarting"), None);
    }

    #[test]
    fn restarts_past_the_backoff_limit_fail_the_job() {
        let (mut j, reports) =
            running(serde_json::json!({"backoffLimit": 1}), WorkerState::Running);
        j.status.as_mut().unwrap().restarts = 1;
        let lost: Vec<NodeView> = nodes().into_iter().filter(|n| n.name != "b").collect();
        let d = decide_at(&j, &lost, &reports, 2);
        assert_eq!(d.status.phase, TrainingPhase::Failed);
        assert!(is(&d, "Failed", "True", "BackoffLimitExceeded"));
        assert!(is(&d, "Running", "False", "BackoffLimitExceeded"));
        assert_eq!(d.status.completion_time, Some(Time(at(2))));
        assert_eq!(
            message(&d, "Failed"),
            "worker 0 on node b: node b is gone; the job has used its backoffLimit of 1 restarts"
        );
        let zero = job(1, serde_json::json!({"backoffLimit": 0}));
        let placed = then(zero.clone(), &decide_at(&zero, &nodes(), &[], 0));
        let d = decide_at(&placed, &lost, &[], 1);
        assert!(
            is(&d, "Failed", "True", "BackoffLimitExceeded"),
            "backoffLimit 0: the first loss fails"
        );
    }

    #[test]
    fn the_deadline_fails_the_job_and_bounds_the_requeue() {
        let (j, reports) = running(
            serde_json::json!({"activeDeadlineSeconds": 10}),
            WorkerState::Running,
        );
        let d = decide_at(&j, &nodes(), &reports, 7);
        assert_eq!(d.status.phase, TrainingPhase::Running);
        assert_eq!(d.requeue, Some(Duration::from_secs(3)));
        let d = decide_at(&j, &nodes(), &reports, 10);
        assert_eq!(d.status.phase, TrainingPhase::Failed);
        assert!(is(&d, "Failed", "True", "DeadlineExceeded"));
        assert_eq!(
            message(&d, "Failed"),
            "the job ran longer than activeDeadlineSeconds (10s)"
        );
    }

    #[test]
    fn limits_past_the_end_of_time_never_expire() {
        let (j, reports) = running(
            serde_json::json!({"activeDeadlineSeconds": u64::MAX, "ttlSecondsAfterFinished": 300_000_000_000u64}),
            WorkerState::Running,
        );
        let d = decide_at(&j, &nodes(), &reports, 10);
        assert_eq!(d.status.phase, TrainingPhase::Running);
        let done = [
            report("b", 0, 0, WorkerState::Succeeded, 100),
            report("a", 1, 0, WorkerState::Succeeded, 100),
        ];
        let d = decide_at(&j, &nodes(), &done, 20);
        assert_eq!(d.status.phase, TrainingPhase::Succeeded);
        let later = decide_at(&then(j, &d), &nodes(), &[], 30);
        assert!(!later.delete);
    }

    #[test]
    fn suspension_waits_for_checkpoints_stops_the_clock_and_resumes() {
        let policy =
            |suspend| serde_json::json!({"suspend": suspend, "activeDeadlineSeconds": 100});
        let (mut j, reports) = running(policy(false), WorkerState::Running);
        j.spec.run_policy = serde_json::from_value(policy(true)).unwrap();
        let d = decide_at(&j, &nodes(), &reports, 5);
        assert_eq!(d.status.phase, TrainingPhase::Running);
        assert!(is(&d, "Suspended", "False", "Suspending"));
        assert_eq!(
            d.status
                .conditions
                .iter()
                .find(|c| c.type_ == "Suspended")
                .unwrap()
                .message,
            "waiting for 2 workers to checkpoint and stop"
        );
        let j = then(j, &d);
        let stopped = [
            report("b", 0, 0, WorkerState::Suspended, 53),
            report("a", 1, 0, WorkerState::Suspended, 51),
        ];
        let d = decide_at(&j, &nodes(), &stopped, 6);
        assert_eq!(d.status.phase, TrainingPhase::Suspended);
        assert!(is(&d, "Suspended", "True", "JobSuspended"));
        assert!(is(&d, "Running", "False", "JobSuspended"));
        assert_eq!(
            (d.status.start_time.clone(), d.requeue, d.status.throughput),
            (None, None, 0.0)
        );
        // No deadline while suspended, however long.
        let j = then(j, &d);
        assert_eq!(
            decide_at(&j, &nodes(), &stopped, 500).status.phase,
            TrainingPhase::Suspended
        );

        let mut j = j;
        j.spec.run_policy = serde_json::from_value(policy(false)).unwrap();
        let d = decide_at(&j, &nodes(), &stopped, 600);
        assert!(is(&d, "Suspended", "False", "JobResumed"));
        assert_eq!(
            d.status.start_time,
            Some(Time(at(600))),
            "the deadline counts from the resume"
        );
        assert_eq!(d.status.phase, TrainingPhase::Running);
        assert_eq!(
            assigned(&d),
            [("b", 0), ("a", 0)],
            "the same nodes, where the checkpoints are"
        );
        assert_eq!(d.status.restarts, 0);
    }

    #[test]
    fn a_suspension_cancelled_before_it_took_effect_resumes() {
        let (mut j, reports) = running(serde_json::json!({"suspend": true}), WorkerState::Running);
        j.status = Some(decide_at(&j, &nodes(), &reports, 2).status);
        j.spec.run_policy.suspend = false;
        let d = decide_at(&j, &nodes(), &reports, 3);
        assert!(is(&d, "Suspended", "False", "JobResumed"));
    }

    #[test]
    fn a_finished_worker_whose_node_goes_is_not_restarted() {
        let (j, _) = running(serde_json::json!({"backoffLimit": 0}), WorkerState::Running);
        let reports = [
            report("b", 0, 0, WorkerState::Succeeded, 100),
            report("a", 1, 0, WorkerState::Running, 60),
        ];
        let j = then(j.clone(), &decide_at(&j, &nodes(), &reports, 2));
        let gone: Vec<NodeView> = nodes().into_iter().filter(|n| n.name != "b").collect();
        let d = decide_at(&j, &gone, &reports[1..], 3);
        assert_eq!(
            (assigned(&d), d.status.restarts, d.status.phase),
            (vec![("b", 0), ("a", 0)], 0, TrainingPhase::Running)
        );
        let done = [report("a", 1, 0, WorkerState::Succeeded, 100)];
        let d = decide_at(&then(j, &d), &gone, &done, 4);
        assert_eq!(d.status.phase, TrainingPhase::Succeeded);
    }

    #[test]
    fn a_worker_lost_while_suspended_waits_for_a_node_without_a_restart() {
        let (mut j, _) = running(serde_json::json!({}), WorkerState::Running);
        j.spec.run_policy.suspend = true;
        let lost: Vec<NodeView> = nodes().into_iter().filter(|n| n.name != "b").collect();
        let stopped = [report("a", 1, 0, WorkerState::Suspended, 51)];
        let d = decide_at(&j, &lost, &stopped, 2);
        assert_eq!(
            (assigned(&d), d.status.restarts),
            (vec![("", 0), ("a", 0)], 0)
        );
        assert_eq!(d.status.phase, TrainingPhase::Suspended);
        let mut j = then(j, &d);
        j.spec.run_policy.suspend = false;
        let mut back = lost.clone();
        back.push(node("e", true, true, 0));
        let d = decide_at(&j, &back, &stopped, 3);
        assert_eq!(assigned(&d), [("e", 0), ("a", 0)]);
        assert_eq!(d.status.phase, TrainingPhase::Restarting);
    }

    #[test]
    fn an_invalid_spec_waits_for_a_change() {
        let mut j = job(1, serde_json::json!({}));
        j.spec.training.learning_rate = -1.0;
        let d = decide_at(&j, &nodes(), &[], 0);
        assert!(is(&d, "Accepted", "False", "InvalidSpec"));
        assert_eq!(condition(&d, "Created"), None);
        assert!(d.status.workers.is_empty() && d.notes.is_empty());
        assert_eq!(d.requeue, None);
    }

    #[test]
    fn conditions_keep_their_transition_time_while_they_hold() {
        let (j, reports) = running(serde_json::json!({}), WorkerState::Running);
        let d = decide_at(&j, &nodes(), &reports, 1000);
        assert_eq!(d.status.conditions, j.status.unwrap().conditions);
        assert!(d.notes.is_empty());
    }
}
