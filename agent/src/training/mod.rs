//! AsyncTrainingJob workers on this node. The operator records in each job's status which
//! node runs which worker; the agent watches the jobs (reading only: it never writes them),
//! runs the workers assigned to its node, and reports their progress in its NodeReport at
//! the report interval.

pub mod checkpoint;
pub mod data;
pub mod metrics;
pub mod worker;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::rollout::Router;
use futures::StreamExt;
use kernelflow_crds::AsyncTrainingJob;
use kernelflow_crds::node_report::WorkerReport;
use kernelflow_crds::training_job::{WorkerState, WorkerStatus};
use kube::api::Api;
use kube::runtime::reflector;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::task::JoinHandle;

use crate::artifact::store::KernelStore;
use crate::warm::Warmer;
use checkpoint::Checkpoints;
use worker::{Assignment, Progress, Stop, StopFlag};

/// How long the checkpoints of a job that is gone are kept: long enough that a job created a
/// moment ago, not yet in this agent's cache, keeps the checkpoints another node wrote.
const KEEP_ORPHANS: Duration = Duration::from_secs(600);

/// What workers share: where kernels, data and checkpoints come from, and the counters.
pub struct Env {
    pub warmer: Arc<Warmer>,
    /// Frozen layers run through their KernelDeployment's traffic split.
    pub router: Arc<Router>,
    pub store: Arc<KernelStore>,
    pub checkpoints: Checkpoints,
    pub metrics: metrics::Counters,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    namespace: String,
    name: String,
    uid: String,
    index: u32,
}

/// A worker assigned to this node.
struct Entry {
    attempt: u32,
    batch_size: u32,
    progress: Arc<Mutex<Progress>>,
    stop: Arc<StopFlag>,
    task: Option<JoinHandle<()>>,
    /// Time and step of the previous report, for samples per second between reports.
    reported: (Instant, u64),
}

/// The workers of this node.
pub struct Trainer {
    node: String,
    env: Arc<Env>,
    workers: Mutex<BTreeMap<Key, Entry>>,
    /// Set by [`Trainer::shut_down`]: no worker starts any more.
    closing: AtomicBool,
}

impl Trainer {
    pub fn new(node: &str, env: Env) -> Arc<Self> {
        Arc::new(Self {
            node: node.into(),
            env: Arc::new(env),
            workers: Mutex::default(),
            closing: AtomicBool::new(false),
        })
    }

    /// Brings the workers in line with the jobs' assignments: starts workers assigned here
    /// (resuming from their checkpoints), suspends them at a checkpoint when their job is
    /// suspended, and stops those assigned elsewhere, under a new attempt, or whose job
    /// finished or is gone.
    pub fn sync(&self, jobs: &[Arc<AsyncTrainingJob>]) {
        let mut wanted = BTreeMap::new();
        for job in jobs {
            let (Some(uid), Some(status)) = (job.uid(), job.status.as_ref()) else {
                continue;
            };
            if job.metadata.deletion_timestamp.is_some() || status.phase.is_finished() {
                continue;
            }
            // A succeeded worker's result is in; an agent that restarted does not run it again.
            let here = |w: &&WorkerStatus| w.node == self.node && w.state != WorkerState::Succeeded;
            for w in status.workers.iter().filter(here) {
                let key = Key {
                    namespace: job.namespace().unwrap_or_default(),
                    name: job.name_any(),
                    uid: uid.clone(),
                    index: w.index,
                };
                wanted.insert(key, (w.attempt, job));
            }
        }
        let mut workers = self.workers.lock().expect("workers lock");
        // The watch may tick on while the agent shuts down: the workers it stops stay
        // stopped. Read under the lock that `shut_down` sets it under.
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        let mut previous = BTreeMap::new();
        workers.retain(|key, e| {
            if wanted
                .get(key)
                .is_some_and(|(attempt, _)| *attempt == e.attempt)
            {
                return true;
            }
            e.stop.set(Stop::Now);
            if let Some(task) = e.task.take() {
                previous.insert(key.clone(), task);
            }
            false
        });
        for (key, (attempt, job)) in wanted {
            let e = workers.entry(key.clone()).or_insert_with(|| Entry {
                attempt,
                batch_size: job.spec.training.batch_size,
                progress: Arc::new(Mutex::new(Progress {
                    state: WorkerState::Starting,
                    ..Progress::default()
                })),
                stop: Arc::default(),
                task: None,
                reported: (Instant::now(), 0),
            });
            let running = e.task.as_ref().is_some_and(|t| !t.is_finished());
            let mut progress = e.progress.lock().expect("progress lock");
            let done = matches!(progress.state, WorkerState::Succeeded | WorkerState::Failed);
            if job.spec.run_policy.suspend {
                if running {
                    e.stop.set(Stop::AtCheckpoint);
                } else if !done {
                    progress.state = WorkerState::Suspended;
                }
                continue;
            }
            // A failed worker waits for the operator to restart it under a new attempt.
            if running || done {
                continue;
            }
            drop(progress);
            e.stop = Arc::default();
            let assignment = Assignment {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid: key.uid.clone(),
                index: key.index,
                spec: job.spec.clone(),
            };
            let before = previous.remove(&key).or_else(|| e.task.take());
            e.task = Some(tokio::spawn(worker::run(
                assignment,
                self.env.clone(),
                e.progress.clone(),
                e.stop.clone(),
                before,
            )));
        }
    }

    /// Stops every worker at its next step boundary, after a checkpoint, and waits for them:
    /// a terminating agent's workers resume from there wherever they run next.
    pub async fn shut_down(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut workers = self.workers.lock().expect("workers lock");
            // Under the lock that `sync` takes: no sync starts a worker after this.
            self.closing.store(true, Ordering::SeqCst);
            workers
                .values_mut()
                .filter_map(|e| {
                    e.stop.set(Stop::AtCheckpoint);
                    e.task.take()
                })
                .collect()
        };
        for task in tasks {
            let _ = task.await;
        }
    }

    /// The node report's worker entries; samples per second are over the time since the
    /// previous call.
    pub fn report(&self) -> Vec<WorkerReport> {
        let now = Instant::now();
        let mut workers = self.workers.lock().expect("workers lock");
        workers
            .iter_mut()
            .map(|(key, e)| {
                let p = e.progress.lock().expect("progress lock").clone();
                let (then, step) = e.reported;
                let seconds = now.duration_since(then).as_secs_f64();
                // Steps of this interval only: a run resumed from a checkpoint did not take the
                // steps before it here.
                let from = step.max(p.resumed_from_step.unwrap_or(0));
                let samples_per_second = if p.state == WorkerState::Running && seconds > 0.0 {
                    p.step.saturating_sub(from) as f64 * f64::from(e.batch_size) / seconds
                } else {
                    0.0
                };
                e.reported = (now, p.step);
                WorkerReport {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    uid: key.uid.clone(),
                    index: key.index,
                    attempt: e.attempt,
                    state: p.state,
                    step: p.step,
                    samples_per_second,
                    first_loss: p.first_loss.map(f64::from),
                    last_loss: p.last_loss.map(f64::from),
                    checkpoint_step: p.checkpoint_step,
                    resumed_from_step: p.resumed_from_step,
                    final_weights_sha256: p.final_weights_sha256.clone(),
                    pipeline: p.figures(),
                    reason: p.reason.map(String::from),
                    message: p.message.clone(),
                    permanent: p.permanent,
                }
            })
            .collect()
    }

    /// Every worker's namespace, job, index and progress, for the metrics.
    fn snapshot(&self) -> Vec<(String, String, u32, Progress)> {
        self.workers
            .lock()
            .expect("workers lock")
            .iter()
            .map(|(k, e)| {
                let p = e.progress.lock().expect("progress lock").clone();
                (k.namespace.clone(), k.name.clone(), k.index, p)
            })
            .collect()
    }

    /// Deletes the checkpoints of jobs that no longer exist, on a blocking thread (it walks
    /// and deletes directories); the returned handle ends with it.
    fn clean_up(&self, jobs: &[Arc<AsyncTrainingJob>]) -> JoinHandle<()> {
        let live: HashSet<String> = jobs.iter().filter_map(|j| j.uid()).collect();
        let env = self.env.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = env.checkpoints.retain(&live, KEEP_ORPHANS) {
                tracing::warn!(error = %e, "deleting old checkpoints failed");
            }
        })
    }
}

/// Watches AsyncTrainingJobs, keeping this node's workers in line with their assignments,
/// until dropped.
pub async fn run(client: Client, trainer: Arc<Trainer>) {
    let (jobs, writer) = reflector::store::<AsyncTrainingJob>();
    let events = reflector::reflector(
        writer,
        watcher(
            Api::<AsyncTrainingJob>::all(client),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| crate::watched("AsyncTrainingJob", r));
    let mut events = std::pin::pin!(events);
    // A tick notices deletions (which touch no object) and finished runs.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut cleanup = tokio::time::interval(Duration::from_secs(60));
    let ready = jobs.wait_until_ready();
    let mut ready = std::pin::pin!(ready);
    // Only a complete cache may decide which jobs are gone.
    let (mut waited, mut is_ready) = (false, false);
    loop {
        tokio::select! {
            Some(()) = events.next() => {}
            _ = tick.tick() => {}
            // Not awaited: the watch goes on while the disk is walked.
            _ = cleanup.tick(), if is_ready => drop(trainer.clean_up(&jobs.state())),
            r = &mut ready, if !waited => (waited, is_ready) = (true, r.is_ok()),
        }
        trainer.sync(&jobs.state());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernelflow_crds::training_job::TrainingPhase;

    fn trainer() -> Arc<Trainer> {
        trainer_in(None)
    }

    /// A trainer keeping checkpoints in `dir`, or in memory.
    fn trainer_in(dir: Option<std::path::PathBuf>) -> Arc<Trainer> {
        let store = KernelStore::for_tests();
        Trainer::new(
            "n",
            Env {
                warmer: Warmer::new(store.clone()),
                router: crate::rollout::tests::router(),
                store,
                checkpoints: Checkpoints::new(dir),
                metrics: metrics::Counters::default(),
            },
        )
    }

    /// A job `name` whose worker 0 is assigned to `node` under `attempt`.
    fn job(
        name: &str,
        steps: u64,
        node: &str,
        attempt: u32,
        suspend: bool,
    ) -> Arc<AsyncTrainingJob> {
        let value = serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "AsyncTrainingJob",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {
                "model": {"layers": [{"name": "a", "conv2d": {"inChannels": 2, "outChannels": 2, "kernelSize": [3, 3], "padding": [1, 1]}}]},
                "data": {"synthetic": {"shape": [2, 6, 6], "samples": 16}},
                "training": {"batchSize": 2, "steps": steps, "learningRate": 0.01},
                "placement": {"nodeSelector": {}},
                "runPolicy": {"suspend": suspend}
            },
            "status": {"phase": "Running", "workers": [{"index": 0, "node": node, "attempt": attempt, "step": 0}]}
        });
        Arc::new(serde_json::from_value(value).unwrap())
    }

    /// Syncs `jobs` until worker `name`'s report satisfies `check`.
    async fn until(
        t: &Trainer,
        jobs: &[Arc<AsyncTrainingJob>],
        name: &str,
        check: impl Fn(&WorkerReport) -> bool,
    ) -> WorkerReport {
        for _ in 0..1000 {
            t.sync(jobs);
            if let Some(r) = t.report().into_iter().find(|r| r.name == name && check(r)) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name} never got there: {:?}", t.report());
    }

    #[tokio::test]
    async fn shutting_down_checkpoints_and_stops_every_worker() {
        let t = trainer();
        let long = job("long", 1_000_000, "n", 0, false);
        until(&t, std::slice::from_ref(&long), "long", |r| r.step > 0).await;
        t.shut_down().await;
        let [stopped] = &t.report()[..] else {
            panic!("one worker")
        };
        assert_eq!(stopped.state, WorkerState::Suspended);
        assert_eq!(stopped.checkpoint_step, Some(stopped.step));
    }

    #[tokio::test]
    async fn workers_stopped_by_shut_down_stay_stopped() {
        let t = trainer();
        let long = job("long", 1_000_000, "n", 0, false);
        until(&t, std::slice::from_ref(&long), "long", |r| r.step > 0).await;
        let closing = tokio::spawn({
            let t = t.clone();
            async move { t.shut_down().await }
        });
        tokio::task::yield_now().await;
        // The job watch ticks on meanwhile.
        for _ in 0..20 {
            t.sync(std::slice::from_ref(&long));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        closing.await.unwrap();
        t.sync(std::slice::from_ref(&long));
        let step = t.report()[0].step;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let [r] = &t.report()[..] else {
            panic!("one worker")
        };
        assert_eq!((r.state, r.step), (WorkerState::Suspended, step));
    }

    #[tokio::test]
    async fn a_succeeded_worker_is_not_run_again() {
        let t = trainer();
        let mut done = (*job("done", 5, "n", 0, false)).clone();
        done.status.as_mut().unwrap().workers[0].state = WorkerState::Succeeded;
        t.sync(&[Arc::new(done)]);
        assert!(t.report().is_empty());
    }

    #[tokio::test]
    async fn clean_up_deletes_only_the_checkpoints_of_jobs_that_are_gone() {
        let dir = std::env::temp_dir().join(format!("kf-clean-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let t = trainer_in(Some(dir.clone()));
        let layers = [kernelflow_crds::Conv2dSpec::new(1, 1, [1, 1])];
        let model = crate::compute::train::Model::new(&layers, [1, 2, 2], 1).unwrap();
        let meta = checkpoint::Meta {
            step: 1,
            first_loss: None,
            fingerprint: String::new(),
        };
        // Both written long enough ago that a job gone is not one just created.
        let long_ago = std::time::SystemTime::now() - KEEP_ORPHANS * 2;
        for uid in ["uid-kept", "uid-gone"] {
            t.env.checkpoints.save(uid, 0, &meta, &model).unwrap();
            let job_dir = std::fs::File::open(dir.join(uid)).unwrap();
            job_dir.set_modified(long_ago).unwrap();
        }
        t.clean_up(&[job("kept", 5, "m", 0, false)]).await.unwrap();
        let load = |uid| t.env.checkpoints.load(uid, 0, usize::MAX).unwrap();
        assert!(load("uid-kept").is_some());
        assert!(load("uid-gone").is_none());
    }

    #[tokio::test]
    async fn workers_follow_their_assignments() {
        let t = trainer();
        let elsewhere = job("elsewhere", 5, "m", 0, false);
        let short = job("short", 5, "n", 0, false);
        let done = until(&t, &[short.clone(), elsewhere.clone()], "short", |r| {
            r.state == WorkerState::Succeeded
        })
        .await;
        assert_eq!(
            (done.uid.as_str(), done.attempt, done.step),
            ("uid-short", 0, 5)
        );
        assert!(done.final_weights_sha256.is_some());
        assert!(t.report().iter().all(|r| r.name != "elsewhere"));

        // Suspended at a checkpoint where it stopped, resumed from there.
        let long = |suspend| job("long", 1_000_000, "n", 0, suspend);
        until(&t, &[long(false)], "long", |r| r.step > 0).await;
        let suspended = until(&t, &[long(true)], "long", |r| {
            r.state == WorkerState::Suspended
        })
        .await;
        assert_eq!(suspended.checkpoint_step, Some(suspended.step));
        let resumed = until(&t, &[long(false)], "long", |r| {
            r.state == WorkerState::Running && r.step > suspended.step
        })
        .await;
        assert_eq!(resumed.resumed_from_step, Some(suspended.step));

        // A new attempt replaces the run; an assignment elsewhere or a finished job ends it.
        let again = until(&t, &[job("long", 1_000_000, "n", 1, false)], "long", |r| {
            r.attempt == 1 && r.state == WorkerState::Running
        })
        .await;
        assert!(again.resumed_from_step.is_some());
        t.sync(&[job("long", 1_000_000, "m", 1, false)]);
        assert!(t.report().is_empty());
        let mut finished = (*short).clone();
        finished.status.as_mut().unwrap().phase = TrainingPhase::Succeeded;
        t.sync(&[Arc::new(finished)]);
        assert!(t.report().is_empty());
    }
}
