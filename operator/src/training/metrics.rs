//! `kernelflow_training_job_info{namespace,name,phase}` (1 for each job's current phase) and
//! `kernelflow_training_job_restarts{namespace,name}` (its status' restarts). Alerts depend
//! on these names. They are read from the controller's cache at scrape time, so a deleted
//! job's series go with it, and only the leader, which runs the controller, exports them.

use std::sync::{Arc, Mutex, RwLock};

use kernelflow_crds::AsyncTrainingJob;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts};

/// The training-job series of the operator's registry.
#[derive(Clone)]
pub struct JobMetrics(Arc<Inner>);

struct Inner {
    jobs: RwLock<Option<Store<AsyncTrainingJob>>>,
    /// Serialises scrapes: each one resets the series and fills them again.
    scrape: Mutex<()>,
    info: IntGaugeVec,
    restarts: IntGaugeVec,
}

impl Default for JobMetrics {
    fn default() -> Self {
        Self(Arc::new(Inner {
            jobs: RwLock::default(),
            scrape: Mutex::default(),
            info: IntGaugeVec::new(
                Opts::new(
                    "training_job_info",
                    "1 for the phase each AsyncTrainingJob is in.",
                ),
                &["namespace", "name", "phase"],
            )
            .expect("valid metric"),
            restarts: IntGaugeVec::new(
                Opts::new(
                    "training_job_restarts",
                    "Worker restarts of each AsyncTrainingJob, counted against its backoffLimit.",
                ),
                &["namespace", "name"],
            )
            .expect("valid metric"),
        }))
    }
}

/// Keeps a controller's jobs exported; dropping it (when leadership is lost) stops that.
pub struct Published(JobMetrics);

impl Drop for Published {
    fn drop(&mut self) {
        *self.0.0.jobs.write().expect("jobs lock") = None;
    }
}

impl JobMetrics {
    /// Exports the jobs in `store` until the returned guard is dropped.
    pub fn publish(&self, store: Store<AsyncTrainingJob>) -> Published {
        *self.0.jobs.write().expect("jobs lock") = Some(store);
        Published(self.clone())
    }
}

impl Collector for JobMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.0
            .info
            .desc()
            .into_iter()
            .chain(self.0.restarts.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.0.scrape.lock().expect("scrape lock");
        let (info, restarts) = (&self.0.info, &self.0.restarts);
        info.reset();
        restarts.reset();
        if let Some(jobs) = self.0.jobs.read().expect("jobs lock").as_ref() {
            for job in jobs.state() {
                let (namespace, name) = (job.namespace().unwrap_or_default(), job.name_any());
                let status = job.status.clone().unwrap_or_default();
                let phase = format!("{:?}", status.phase);
                info.with_label_values(&[&namespace, &name, &phase]).set(1);
                restarts
                    .with_label_values(&[&namespace, &name])
                    .set(i64::from(status.restarts));
            }
        }
        info.collect()
            .into_iter()
            .chain(restarts.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::watcher;

    fn job(name: &str, phase: &str, restarts: u32) -> AsyncTrainingJob {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "AsyncTrainingJob",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {
                "model": {"layers": [{"name": "a", "conv2d": {"inChannels": 1, "outChannels": 1, "kernelSize": [1, 1]}}]},
                "data": {"synthetic": {"shape": [1, 2, 2], "samples": 2}},
                "training": {"batchSize": 1, "steps": 1, "learningRate": 0.1},
                "placement": {"nodeSelector": {}}
            },
            "status": {"phase": phase, "restarts": restarts}
        }))
        .unwrap()
    }

    fn text(m: &JobMetrics) -> String {
        let registry = prometheus::Registry::new_custom(Some("kernelflow".into()), None).unwrap();
        registry.register(Box::new(m.clone())).unwrap();
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut buf,
        )
        .unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn series_follow_the_cached_jobs_while_published() {
        let (store, mut writer) = kube::runtime::reflector::store::<AsyncTrainingJob>();
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(job("a", "Running", 0)));
        writer.apply_watcher_event(&watcher::Event::InitApply(job("b", "Failed", 3)));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let metrics = JobMetrics::default();
        let published = metrics.publish(store);
        let out = text(&metrics);
        assert!(
            out.contains(
                r#"kernelflow_training_job_info{name="a",namespace="ns",phase="Running"} 1"#
            ),
            "{out}"
        );
        assert!(
            out.contains(
                r#"kernelflow_training_job_info{name="b",namespace="ns",phase="Failed"} 1"#
            ),
            "{out}"
        );
        assert!(
            !out.contains(r#"name="a",namespace="ns",phase="Failed""#),
            "{out}"
        );
        assert!(
            out.contains(r#"kernelflow_training_job_restarts{name="b",namespace="ns"} 3"#),
            "{out}"
        );
        writer.apply_watcher_event(&watcher::Event::Delete(job("b", "Failed", 3)));
        assert!(
            !text(&metrics).contains(r#"name="b""#),
            "a deleted job's series go"
        );
        drop(published);
        assert!(
            !text(&metrics).contains("training_job_info{"),
            "not exported without leading"
        );
    }
}
