//! AsyncTrainingJobs against the real API server, with the operator and agents as processes:
//! jobs train to success with their loss going down, pipeline modes agree, suspension and
//! resumption, the deadline and time to live, and workers that survive a killed agent (on
//! its node, or moved to another) with the weights of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kernelflow_crds::training_job::{TrainingPhase, WorkerState, WorkerStatus};
use kernelflow_crds::{AsyncTrainingJob, NodeReport};
use kernelflow_e2e::env::{Process, Shared};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};

use crate::{eventually, gpu_node, merged, operator_with, setup, training_job};

const WAIT: Duration = Duration::from_secs(120);

/// A small job on the nodes labelled `pool` (and only those): the admission tests' valid job
/// made quick, 3x8x8 inputs through 3 -> 4 -> 3 channels, a checkpoint every 10 steps.
pub(crate) fn job(name: &str, pool: &str, patch: serde_json::Value) -> AsyncTrainingJob {
    let conv = |name: &str, c: u32, k: u32| serde_json::json!({"name": name, "conv2d": {"inChannels": c, "outChannels": k, "kernelSize": [3, 3], "padding": [1, 1]}});
    let small = serde_json::json!({"spec": {
        "model": {"layers": [conv("conv1", 3, 4), conv("conv2", 4, 3)]},
        "data": {"synthetic": {"shape": [3, 8, 8], "samples": 64}},
        "training": {"batchSize": 4, "steps": 60, "learningRate": 0.05, "seed": 1},
        "placement": {"nodeSelector": {"matchLabels": {"nvidia.com/gpu.present": null, "pool": pool}}},
        "checkpoint": {"everySteps": 10}}});
    let job = merged(merged(training_job(name), small), patch);
    serde_json::from_value(job).expect("a valid job")
}

/// The test's nodes `<ns>-<n>`, labelled `pool=<ns>` and `slot=<n>`, and their agents.
struct Cluster {
    env: &'static Shared,
    client: kube::Client,
    ns: String,
    jobs: Api<AsyncTrainingJob>,
    operator: Process,
}

impl Cluster {
    async fn start(prefix: &str, operator_flags: &[&str]) -> Self {
        let (env, client, ns) = setup(prefix).await;
        let operator = operator_with(env, &ns, operator_flags);
        Self {
            jobs: Api::namespaced(client.clone(), &ns),
            env,
            client,
            ns,
            operator,
        }
    }

    fn node(&self, n: &str) -> String {
        format!("{}-{n}", self.ns)
    }

    /// Registers node `n` (with `labels`) and starts its agent with checkpoints in `dir`.
    async fn agent(&self, n: &str, labels: serde_json::Value, dir: &Path) -> Process {
        let labels = merged(serde_json::json!({"pool": self.ns, "slot": n}), labels);
        let flags = ["--checkpoint-dir", dir.to_str().unwrap()];
        gpu_node(self.env, &self.client, &self.node(n), labels, &flags).await
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.env.logs.join(format!("{}-{name}", self.ns))
    }

    async fn create(&self, job: &AsyncTrainingJob) -> AsyncTrainingJob {
        self.jobs.create(&PostParams::default(), job).await.unwrap()
    }

    /// Waits until job `name`'s status satisfies `check`.
    async fn until(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&kernelflow_crds::AsyncTrainingJobStatus) -> bool,
    ) -> AsyncTrainingJob {
        let found = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(job) = self.jobs.get(name).await
                    && job.status.as_ref().is_some_and(&check)
                {
                    return job;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        match found {
            Ok(job) => job,
            Err(_) => {
                let now = self.jobs.get_opt(name).await.ok().flatten();
                panic!(
                    "timed out waiting for {name}: {what}\nstatus: {:#?}\n{}",
                    now.and_then(|j| j.status),
                    self.operator.log_tail()
                )
            }
        }
    }

    async fn phase(&self, name: &str, phase: TrainingPhase) -> AsyncTrainingJob {
        self.until(name, &format!("phase {phase:?}"), |s| s.phase == phase)
            .await
    }

    async fn suspend(&self, name: &str, suspend: bool) {
        let patch = serde_json::json!({"spec": {"runPolicy": {"suspend": suspend}}});
        self.jobs
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
    }

    /// Reasons of the Events about job `name`.
    async fn events(&self, name: &str) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.reason)
            .collect()
    }

    /// Waits until the Events about job `name` include `reason`.
    async fn event(&self, name: &str, reason: &str) {
        eventually(WAIT, &format!("a {reason} event for {name}"), || async {
            self.events(name)
                .await
                .iter()
                .any(|r| r == reason)
                .then_some(())
        })
        .await;
    }
}

fn condition(job: &AsyncTrainingJob, type_: &str) -> (String, String) {
    let c = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition: {:#?}", job.status));
    (c.status.clone(), c.reason.clone())
}

fn worker(job: &AsyncTrainingJob, index: usize) -> WorkerStatus {
    job.status.as_ref().unwrap().workers[index].clone()
}

fn digest(job: &AsyncTrainingJob, index: usize) -> String {
    worker(job, index)
        .final_weights_sha256
        .unwrap_or_else(|| panic!("no final weights: {:#?}", job.status))
}

/// Checkpoint path of worker `index` of `job` under an agent's checkpoint directory.
fn checkpoint(dir: &Path, job: &AsyncTrainingJob, index: u32) -> PathBuf {
    dir.join(job.uid().unwrap())
        .join(format!("worker-{index}.ckpt"))
}

#[tokio::test]
async fn a_job_trains_to_success_with_its_loss_going_down() {
    let c = Cluster::start("train", &[]).await;
    let dir = c.dir("ckpt");
    let _a = c.agent("a", serde_json::json!({}), &dir).await;
    let _b = c.agent("b", serde_json::json!({}), &dir).await;
    let outside = c
        .agent("c", serde_json::json!({"pool": "elsewhere"}), &dir)
        .await;
    c.create(&job(
        "train",
        &c.ns,
        serde_json::json!({"spec": {"placement": {"replicas": 2}}}),
    ))
    .await;

    let done = c.phase("train", TrainingPhase::Succeeded).await;
    let s = done.status.clone().unwrap();
    let mut nodes: Vec<_> = s.workers.iter().map(|w| w.node.clone()).collect();
    nodes.sort();
    assert_eq!(
        nodes,
        [c.node("a"), c.node("b")],
        "one worker per selected node"
    );
    for w in &s.workers {
        assert_eq!((w.state, w.step), (WorkerState::Succeeded, 60));
        let (first, last) = (w.first_loss.unwrap(), w.last_loss.unwrap());
        assert!(
            last < 0.8 * first,
            "worker {}: loss {first} -> {last}",
            w.index
        );
        println!(
            "worker {} on {}: loss {first:.4} -> {last:.4}",
            w.index, w.node
        );
    }
    assert_ne!(
        digest(&done, 0),
        digest(&done, 1),
        "workers train on other samples"
    );
    assert_eq!((s.progress.as_deref(), s.restarts), (Some("100%"), 0));
    assert!(s.completion_time.is_some() && s.start_time.is_some());
    assert_eq!(
        condition(&done, "Succeeded"),
        ("True".into(), "JobSucceeded".into())
    );
    assert_eq!(
        condition(&done, "Created"),
        ("True".into(), "JobCreated".into())
    );
    for reason in ["WorkerPlaced", "JobCreated", "JobSucceeded"] {
        c.event("train", reason).await;
    }

    let info = format!(
        "kernelflow_training_job_info{{name=\"train\",namespace=\"{}\",phase=\"Succeeded\"}} 1",
        c.ns
    );
    // The series is read from the operator's cache of jobs, which its watch may bring up to
    // date after the status write seen above.
    let info = &info;
    let metrics = eventually(WAIT, "the Succeeded job's info series", || async {
        let (_, metrics) = c.operator.get("/metrics").await?;
        metrics.contains(info).then_some(metrics)
    })
    .await;
    let restarts = format!(
        "kernelflow_training_job_restarts{{name=\"train\",namespace=\"{}\"}} 0",
        c.ns
    );
    assert!(metrics.contains(&restarts), "{metrics}");
    let outside_report = Api::<NodeReport>::all(c.client.clone())
        .get(&c.node("c"))
        .await
        .unwrap();
    assert!(
        outside_report.spec.workers.is_empty(),
        "{}",
        outside.log_tail()
    );
}

/// The same job in sequential and triple-buffered mode, one after the other on one node:
/// the same weights (compute runs the steps in order either way) and, in the log, how much
/// the triple buffering hid behind compute.
#[tokio::test]
async fn triple_buffering_and_sequential_train_the_same_weights() {
    let c = Cluster::start("pipeline", &[]).await;
    let _a = c.agent("a", serde_json::json!({}), &c.dir("ckpt")).await;
    let mut digests = Vec::new();
    for mode in ["sequential", "triple"] {
        let spec = serde_json::json!({"spec": {"pipeline": {"mode": mode}, "training": {"steps": 200}, "checkpoint": {"everySteps": 50}}});
        c.create(&job(mode, &c.ns, spec)).await;
        let done = c.phase(mode, TrainingPhase::Succeeded).await;
        let f = worker(&done, 0).pipeline.expect("pipeline figures");
        let [load, upload, compute, download] = f.stage_seconds;
        println!(
            "{mode:>10}: {} steps in {:.3} s ({:.0} samples/s); stages load {load:.3} upload {upload:.3} compute {compute:.3} download {download:.3} s; speedup theoretical {:.2}x measured {:.2}x; overlap efficiency {:.0}%",
            f.steps,
            f.wall_seconds,
            f.steps as f64 * 4.0 / f.wall_seconds,
            f.theoretical_speedup,
            f.measured_speedup,
            f.overlap_efficiency * 100.0
        );
        assert_eq!(f.steps, 200);
        digests.push(digest(&done, 0));
    }
    assert_eq!(digests[0], digests[1]);
}

#[tokio::test]
async fn a_suspended_job_stops_at_a_checkpoint_and_resumes_from_it() {
    let c = Cluster::start("suspend", &[]).await;
    let agent = c.agent("a", serde_json::json!({}), &c.dir("ckpt")).await;
    let long = serde_json::json!({"spec": {"training": {"steps": 100_000_000}, "checkpoint": {"everySteps": 1_000_000}}});
    c.create(&job("long", &c.ns, long)).await;
    c.until("long", "running steps", |s| {
        s.phase == TrainingPhase::Running && s.workers[0].step > 0
    })
    .await;
    let metrics = agent.get("/metrics").await.unwrap().1;
    for series in [
        "kernelflow_agent_training_steps_total{",
        "kernelflow_agent_training_loss{",
        "kernelflow_agent_training_pipeline_stage_seconds_total{",
        "kernelflow_agent_training_overlap_efficiency{",
        "kernelflow_agent_training_stream_utilization{",
        "kernelflow_agent_training_fallbacks_total{",
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }

    c.suspend("long", true).await;
    let suspended = c.phase("long", TrainingPhase::Suspended).await;
    let w = worker(&suspended, 0);
    assert_eq!(w.state, WorkerState::Suspended);
    assert_eq!(
        w.checkpoint_step,
        Some(w.step),
        "a checkpoint where it stopped"
    );
    assert_eq!(
        condition(&suspended, "Suspended"),
        ("True".into(), "JobSuspended".into())
    );
    assert_eq!(
        condition(&suspended, "Running"),
        ("False".into(), "JobSuspended".into())
    );
    assert_eq!(suspended.status.as_ref().unwrap().start_time, None);

    c.suspend("long", false).await;
    let at = w.step;
    let resumed = c
        .until("long", "training again from the checkpoint", |s| {
            let w = &s.workers[0];
            s.phase == TrainingPhase::Running && w.resumed_from_step.is_some() && w.step > at
        })
        .await;
    assert_eq!(worker(&resumed, 0).resumed_from_step, Some(at));
    assert_eq!(
        condition(&resumed, "Suspended"),
        ("False".into(), "JobResumed".into())
    );
    assert_eq!(resumed.status.as_ref().unwrap().restarts, 0);
    c.event("long", "JobSuspended").await;
    c.event("long", "JobResumed").await;
}

#[tokio::test]
async fn the_deadline_fails_a_job_and_its_ttl_deletes_it() {
    let c = Cluster::start("deadline", &[]).await;
    let _a = c.agent("a", serde_json::json!({}), &c.dir("ckpt")).await;
    let policy = serde_json::json!({"spec": {"training": {"steps": 100_000_000},
        "runPolicy": {"activeDeadlineSeconds": 2, "ttlSecondsAfterFinished": 2}}});
    c.create(&job("slow", &c.ns, policy)).await;
    let failed = c.phase("slow", TrainingPhase::Failed).await;
    assert_eq!(
        condition(&failed, "Failed"),
        ("True".into(), "DeadlineExceeded".into())
    );
    let s = failed.status.clone().unwrap();
    let ran = s
        .completion_time
        .unwrap()
        .0
        .duration_since(s.start_time.unwrap().0);
    assert!(ran.as_secs_f64() >= 2.0, "failed after {ran:?}");
    c.event("slow", "DeadlineExceeded").await;
    // The agent stops the worker and drops it from its report.
    let reports: Api<NodeReport> = Api::all(c.client.clone());
    eventually(WAIT, "the worker gone from the node report", || async {
        reports
            .get(&c.node("a"))
            .await
            .ok()?
            .spec
            .workers
            .is_empty()
            .then_some(())
    })
    .await;
    eventually(WAIT, "the job deleted after its ttl", || async {
        c.jobs.get_opt("slow").await.ok()?.is_none().then_some(())
    })
    .await;
}

/// A job on the nodes with `labels`, long enough that a checkpoint is on disk well before it
/// finishes.
fn resumable(name: &str, labels: serde_json::Value, patch: serde_json::Value) -> AsyncTrainingJob {
    let base = serde_json::json!({"spec": {"training": {"steps": 600}, "checkpoint": {"everySteps": 10},
        "placement": {"nodeSelector": {"matchLabels": labels}}}});
    job(name, "unused", merged(base, patch))
}

#[tokio::test]
async fn an_agent_killed_mid_job_resumes_from_its_checkpoint_with_the_same_weights() {
    let c = Cluster::start("killed", &[]).await;
    let (dir_a, dir_b) = (c.dir("ckpt-a"), c.dir("ckpt-b"));
    let mut a = c.agent("a", serde_json::json!({}), &dir_a).await;
    let _b = c.agent("b", serde_json::json!({}), &dir_b).await;
    let on = |n: &str| serde_json::json!({"pool": c.ns, "slot": n});
    let none = serde_json::json!({});
    let victim = c.create(&resumable("victim", on("a"), none.clone())).await;
    c.create(&resumable("reference", on("b"), none)).await;

    let file = checkpoint(&dir_a, &victim, 0);
    eventually(WAIT, "the victim's first checkpoint", || async {
        file.exists().then_some(())
    })
    .await;
    a.kill();
    let a = c.agent("a", serde_json::json!({}), &dir_a).await;

    let done = c.phase("victim", TrainingPhase::Succeeded).await;
    let reference = c.phase("reference", TrainingPhase::Succeeded).await;
    let w = worker(&done, 0);
    let from = w
        .resumed_from_step
        .unwrap_or_else(|| panic!("did not resume: {w:?}\n{}", a.log_tail()));
    assert!(
        from > 0 && from < 600 && from.is_multiple_of(10),
        "resumed from step {from}"
    );
    println!("the victim resumed from step {from}");
    assert_eq!(
        done.status.as_ref().unwrap().restarts,
        0,
        "back within the grace period"
    );
    assert_eq!(digest(&done, 0), digest(&reference, 0));
}

#[tokio::test]
async fn a_worker_whose_agent_is_gone_restarts_elsewhere_within_the_backoff_limit() {
    // Reports every second, heartbeats in whole seconds, two busy cores: a grace of a few
    // reports keeps a live agent from looking lost.
    let c = Cluster::start("moved", &["--worker-grace-seconds", "8"]).await;
    // a and b share checkpoint storage, so a worker moved from a to b resumes on b.
    let (shared, own) = (c.dir("ckpt-shared"), c.dir("ckpt-c"));
    let mut a = c
        .agent("a", serde_json::json!({"group": "ab"}), &shared)
        .await;
    let _c = c.agent("c", serde_json::json!({}), &own).await;
    let on = |labels: serde_json::Value| merged(serde_json::json!({"pool": c.ns}), labels);
    let limit = |n: u32| serde_json::json!({"spec": {"runPolicy": {"backoffLimit": n}}});
    let moved = resumable("moved", on(serde_json::json!({"group": "ab"})), limit(1));
    let moved = c.create(&moved).await;
    c.create(&resumable(
        "doomed",
        on(serde_json::json!({"slot": "a"})),
        limit(0),
    ))
    .await;
    c.create(&resumable(
        "reference",
        on(serde_json::json!({"slot": "c"})),
        limit(0),
    ))
    .await;
    for name in ["moved", "doomed"] {
        let on_a = c
            .until(name, "a worker on node a", |s| {
                s.workers.first().is_some_and(|w| !w.node.is_empty())
            })
            .await;
        assert_eq!(worker(&on_a, 0).node, c.node("a"));
    }
    let _b = c
        .agent("b", serde_json::json!({"group": "ab"}), &shared)
        .await;
    let file = checkpoint(&shared, &moved, 0);
    eventually(WAIT, "the first checkpoint", || async {
        file.exists().then_some(())
    })
    .await;
    a.kill();

    let failed = c.phase("doomed", TrainingPhase::Failed).await;
    assert_eq!(
        condition(&failed, "Failed"),
        ("True".into(), "BackoffLimitExceeded".into())
    );
    let done = c.phase("moved", TrainingPhase::Succeeded).await;
    let w = worker(&done, 0);
    assert_eq!((w.node.as_str(), w.attempt), (c.node("b").as_str(), 1));
    assert_eq!(done.status.as_ref().unwrap().restarts, 1);
    assert!(w.resumed_from_step.is_some_and(|s| s > 0), "{w:?}");
    let reference = c.phase("reference", TrainingPhase::Succeeded).await;
    assert_eq!(digest(&done, 0), digest(&reference, 0));
    c.event("moved", "WorkerRestarted").await;
}

/// A job whose middle layer is a KernelDeployment's kernel: frozen, from the kernel warm on
/// the node. A kernel that does not chain with the layers around it fails the job at once,
/// naming the layer, instead of spending its backoff limit.
#[tokio::test]
async fn kernel_deployment_layers_train_frozen_and_a_mismatch_fails_at_once() {
    let c = Cluster::start("frozen", &[]).await;
    let _a = c.agent("a", serde_json::json!({}), &c.dir("ckpt")).await;
    let (url, sha256) = crate::pack(c.env, &format!("{}-kernel", c.ns), 64, 3, &[]);
    let kd = merged(
        crate::kernel_deployment("conv64"),
        serde_json::json!({"spec": {"kernel": {"artifact": {"url": url, "sha256": sha256}},
            "nodeSelector": {"matchLabels": {"pool": c.ns}}}}),
    );
    let kd: kernelflow_crds::KernelDeployment = serde_json::from_value(kd).unwrap();
    Api::<kernelflow_crds::KernelDeployment>::namespaced(c.client.clone(), &c.ns)
        .create(&PostParams::default(), &kd)
        .await
        .unwrap();
    // The packed kernel is 64 -> 64 channels, 3x3, padding 1.
    let layers = |stem: u32| {
        serde_json::json!({"spec": {"model": {"layers": [
            {"name": "stem", "conv2d": {"inChannels": 3, "outChannels": stem, "kernelSize": [1, 1]}},
            {"name": "body", "kernelDeploymentRef": "conv64"},
            {"name": "head", "conv2d": {"inChannels": 64, "outChannels": 3, "kernelSize": [1, 1]}}]},
            "data": {"synthetic": {"shape": [3, 4, 4]}}, "training": {"steps": 20}}})
    };
    c.create(&job("frozen", &c.ns, layers(64))).await;
    c.create(&job("mismatched", &c.ns, layers(32))).await;

    let done = c.phase("frozen", TrainingPhase::Succeeded).await;
    let w = worker(&done, 0);
    let losses = w.last_loss.zip(w.first_loss);
    assert!(losses.is_some_and(|(last, first)| last < first), "{w:?}");
    let failed = c.phase("mismatched", TrainingPhase::Failed).await;
    assert_eq!(
        condition(&failed, "Failed"),
        ("True".into(), "WorkerFailed".into())
    );
    let message = &failed
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .unwrap()
        .message;
    assert!(
        message.contains("InvalidModel")
            && message.contains("inChannels: is 64 but 32 channels come into this layer"),
        "{message}"
    );
    assert_eq!(failed.status.as_ref().unwrap().restarts, 0);
}
