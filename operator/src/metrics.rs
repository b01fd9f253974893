//! Prometheus metrics of the operator, on its own registry.

use std::time::Duration;

use kernelflow_crds::kernel_deployment::KernelDeploymentStatus;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use kernelflow_crds::{KernelDeployment, NodeReport};
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

use crate::rollout::Outcome;

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub leader: IntGauge,
    pub admission_reviews: IntCounterVec,
    pub webhook_connections_refused: prometheus::IntCounter,
    rollout_analysis: IntCounterVec,
    rollout_rollbacks: IntCounterVec,
    rollout_duration: HistogramVec,
    pub training_jobs: crate::training::metrics::JobMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        let registry =
            Registry::new_custom(Some("kernelflow".into()), None).expect("a valid prefix");
        let reconciliations = IntCounterVec::new(
            Opts::new("reconciliations_total", "Reconciles run, by controller."),
            &["controller"],
        )
        .expect("valid metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "reconcile_errors_total",
                "Reconciles that failed, by controller and error.",
            ),
            &["controller", "error"],
        )
        .expect("valid metric");
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Time spent in one reconcile.")
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            &["controller"],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "operator_leader",
            "1 while this replica holds the leader Lease.",
        )
        .expect("valid metric");
        let admission_reviews = IntCounterVec::new(
            Opts::new(
                "admission_reviews_total",
                "Admission reviews answered, by kind and verdict.",
            ),
            &["kind", "allowed"],
        )
        .expect("valid metric");
        let webhook_connections_refused = prometheus::IntCounter::new(
            "webhook_connections_refused_total",
            "Connections the webhook closed at once, holding as many as it may.",
        )
        .expect("valid metric");
        let kd = &["namespace", "name"];
        let rollout_analysis = IntCounterVec::new(
            Opts::new(
                "rollout_analysis_total",
                "Analyses run, by result: pass, fail or inconclusive.",
            ),
            &["namespace", "name", "result"],
        )
        .expect("valid metric");
        let rollout_rollbacks = IntCounterVec::new(
            Opts::new(
                "rollout_rollbacks_total",
                "Rollouts rolled back by analysis.",
            ),
            kd,
        )
        .expect("valid metric");
        let rollout_duration = HistogramVec::new(
            HistogramOpts::new(
                "rollout_duration_seconds",
                "Time from a rollout's start to its end, by outcome.",
            )
            .buckets(vec![
                10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
            ]),
            &["outcome"],
        )
        .expect("valid metric");
        let training_jobs = crate::training::metrics::JobMetrics::default();
        for m in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(leader.clone()),
            Box::new(admission_reviews.clone()),
            Box::new(webhook_connections_refused.clone()),
            Box::new(rollout_analysis.clone()),
            Box::new(rollout_rollbacks.clone()),
            Box::new(rollout_duration.clone()),
            Box::new(training_jobs.clone()),
        ] {
            registry.register(m).expect("metrics registered once");
        }
        Self {
            registry,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            leader,
            admission_reviews,
            webhook_connections_refused,
            rollout_analysis,
            rollout_rollbacks,
            rollout_duration,
            training_jobs,
        }
    }
}

/// Keeps the leader's series exported; dropping it (when the Lease is lost) withdraws the
/// heartbeats, the rollout gauges and the analysis counts, so that a standby exports none
/// of them stale.
pub struct Leading {
    metrics: Metrics,
    series: LeaderSeries,
}

impl Drop for Leading {
    fn drop(&mut self) {
        let m = &self.metrics;
        let _ = m.registry.unregister(Box::new(self.series.clone()));
        m.rollout_analysis.reset();
        m.rollout_rollbacks.reset();
    }
}

/// Series read from the controller's caches at scrape time, so that an object that goes
/// takes its series with it: each node's last report, and each KernelDeployment's rollout
/// as its status says (a deployment whose finalizer was removed by hand too, which no
/// reconcile sees go).
#[derive(Clone)]
struct LeaderSeries {
    reports: Store<NodeReport>,
    deployments: Store<KernelDeployment>,
    desc: Vec<Desc>,
}

/// The gauges [`LeaderSeries`] fills afresh at each scrape.
struct Gauges {
    heartbeat: GaugeVec,
    info: IntGaugeVec,
    step: IntGaugeVec,
    traffic: IntGaugeVec,
    step_started: GaugeVec,
}

impl Gauges {
    fn new() -> Self {
        let kd = &["namespace", "name"];
        let gauge = |name, help, labels: &[&str]| {
            GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let int = |name, help, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        Self {
            heartbeat: gauge(
                "node_report_heartbeat_timestamp_seconds",
                "Unix time of each node agent's latest report, as the API server stored it.",
                &["node"],
            ),
            info: int(
                "rollout_info",
                "1 for the phase a KernelDeployment's rollout is in.",
                &["namespace", "name", "phase"],
            ),
            step: int("rollout_step", "Index of the current rollout step.", kd),
            traffic: int(
                "rollout_traffic_percent",
                "Percent of conv2d operations on the canary revision.",
                kd,
            ),
            step_started: gauge(
                "rollout_step_started_timestamp_seconds",
                "Unix time the current rollout step began.",
                kd,
            ),
        }
    }

    fn all(&self) -> [&dyn Collector; 5] {
        [
            &self.heartbeat,
            &self.info,
            &self.step,
            &self.traffic,
            &self.step_started,
        ]
    }

    /// The series of one KernelDeployment's rollout, from its status.
    fn rollout(&self, namespace: &str, name: &str, status: &KernelDeploymentStatus) {
        let phase = format!("{:?}", status.phase);
        self.info
            .with_label_values(&[namespace, name, &phase])
            .set(1);
        let kd = [namespace, name];
        self.step
            .with_label_values(&kd)
            .set(status.current_step_index.map_or(-1, i64::from));
        self.traffic
            .with_label_values(&kd)
            .set(status.traffic_percent.into());
        if let Some(t) = &status.step_start_time {
            self.step_started
                .with_label_values(&kd)
                .set(t.0.as_millisecond() as f64 / 1e3);
        }
    }
}

impl Collector for LeaderSeries {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let g = Gauges::new();
        for r in self.reports.state() {
            g.heartbeat
                .with_label_values(&[&r.spec.node_name])
                .set(crate::nodes::written(&r).as_millisecond() as f64 / 1e3);
        }
        for kd in self.deployments.state() {
            if let Some(status) = &kd.status {
                let (namespace, name) = (kd.namespace().unwrap_or_default(), kd.name_any());
                g.rollout(&namespace, &name, status);
            }
        }
        g.all().into_iter().flat_map(Collector::collect).collect()
    }
}

impl Metrics {
    /// Exports the heartbeat of every node report in `reports` and the rollout of every
    /// KernelDeployment in `deployments`, until the returned guard is dropped.
    /// One guard at a time: the previous term's, dropped, has withdrawn its collector.
    pub fn lead(
        &self,
        reports: Store<NodeReport>,
        deployments: Store<KernelDeployment>,
    ) -> Leading {
        let g = Gauges::new();
        let desc = g
            .all()
            .into_iter()
            .flat_map(|c| c.desc())
            .cloned()
            .collect();
        let series = LeaderSeries {
            reports,
            deployments,
            desc,
        };
        self.registry
            .register(Box::new(series.clone()))
            .expect("the previous term's collector is gone");
        Leading {
            metrics: self.clone(),
            series,
        }
    }

    pub fn analysis(&self, namespace: &str, name: &str, result: &str) {
        self.rollout_analysis
            .with_label_values(&[namespace, name, result])
            .inc();
    }

    pub fn finished(&self, namespace: &str, name: &str, outcome: Outcome, took: Duration) {
        if outcome == Outcome::RolledBack {
            self.rollout_rollbacks
                .with_label_values(&[namespace, name])
                .inc();
        }
        self.rollout_duration
            .with_label_values(&[outcome.label()])
            .observe(took.as_secs_f64());
    }

    /// Drops the counts of a deleted KernelDeployment (its gauges go with it from the cache).
    pub fn forget_rollout(&self, namespace: &str, name: &str) {
        for result in ["pass", "fail", "inconclusive"] {
            let _ = self
                .rollout_analysis
                .remove_label_values(&[namespace, name, result]);
        }
        let _ = self
            .rollout_rollbacks
            .remove_label_values(&[namespace, name]);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    use super::*;

    fn kd(status: KernelDeploymentStatus) -> KernelDeployment {
        KernelDeployment {
            status: Some(status),
            ..crate::nodes::tests::kd()
        }
    }

    /// A leader's metrics over caches that `apply` fills.
    fn lead(m: &Metrics) -> (Leading, Writer<KernelDeployment>) {
        let (deployments, writer) = kube::runtime::reflector::store();
        let reports = kube::runtime::reflector::store::<NodeReport>().0;
        (m.lead(reports, deployments), writer)
    }

    #[test]
    fn leadership_lost_withdraws_the_leaders_series() {
        let m = Metrics::default();
        let (leading, mut cache) = lead(&m);
        cache.apply_watcher_event(&Event::Apply(kd(KernelDeploymentStatus::default())));
        m.analysis("ns", "k", "pass");
        assert!(
            m.render()
                .contains("rollout_info{name=\"kd\",namespace=\"ns\",phase=\"Pending\"} 1")
        );
        assert!(m.render().contains("rollout_analysis_total{"));
        drop(leading);
        assert!(!m.render().contains("rollout_info{"));
        assert!(!m.render().contains("rollout_analysis_total{"));
        // Leading again registers the collector anew.
        let _again = lead(&m);
    }

    #[test]
    fn a_deployment_gone_from_the_cache_takes_its_gauges_with_it() {
        let m = Metrics::default();
        let (_leading, mut cache) = lead(&m);
        let k = kd(KernelDeploymentStatus::default());
        cache.apply_watcher_event(&Event::Apply(k.clone()));
        assert!(
            m.render()
                .contains("rollout_step{name=\"kd\",namespace=\"ns\"} -1")
        );
        cache.apply_watcher_event(&Event::Delete(k));
        let text = m.render();
        assert!(
            !text.contains("rollout_info{") && !text.contains("rollout_step{"),
            "{text}"
        );
    }

    #[test]
    fn a_step_start_goes_when_the_rollout_has_no_step() {
        let m = Metrics::default();
        let (_leading, mut cache) = lead(&m);
        let mut status = KernelDeploymentStatus {
            step_start_time: Some(Time(Timestamp::from_second(1_800_000_000).unwrap())),
            ..Default::default()
        };
        cache.apply_watcher_event(&Event::Apply(kd(status.clone())));
        assert!(
            m.render()
                .contains("step_started_timestamp_seconds{name=\"kd\"")
        );
        status.step_start_time = None;
        cache.apply_watcher_event(&Event::Apply(kd(status)));
        assert!(
            !m.render()
                .contains("step_started_timestamp_seconds{name=\"kd\"")
        );
    }
}
