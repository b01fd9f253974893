//! Prometheus metrics of the operator, on its own registry.

use std::time::Duration;

use kernelflow_crds::kernel_deployment::{KernelDeploymentStatus, RolloutPhase};
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use kernelflow_crds::NodeReport;
use kube::runtime::reflector::Store;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;

use crate::rollout::Outcome;

const PHASES: [RolloutPhase; 8] = [
    RolloutPhase::Pending,
    RolloutPhase::Warming,
    RolloutPhase::Progressing,
    RolloutPhase::Paused,
    RolloutPhase::Healthy,
    RolloutPhase::Degraded,
    RolloutPhase::RolledBack,
    RolloutPhase::Failed,
];

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub leader: IntGauge,
    pub admission_reviews: IntCounterVec,
    rollout_info: IntGaugeVec,
    rollout_step: IntGaugeVec,
    rollout_traffic: IntGaugeVec,
    rollout_step_started: GaugeVec,
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
        let kd = &["namespace", "name"];
        let rollout_info = IntGaugeVec::new(
            Opts::new(
                "rollout_info",
                "1 for the phase a KernelDeployment's rollout is in.",
            ),
            &["namespace", "name", "phase"],
        )
        .expect("valid metric");
        let rollout_step = IntGaugeVec::new(
            Opts::new("rollout_step", "Index of the current rollout step."),
            kd,
        )
        .expect("valid metric");
        let rollout_traffic = IntGaugeVec::new(
            Opts::new(
                "rollout_traffic_percent",
                "Percent of conv2d operations on the canary revision.",
            ),
            kd,
        )
        .expect("valid metric");
        let rollout_step_started = GaugeVec::new(
            Opts::new(
                "rollout_step_started_timestamp_seconds",
                "Unix time the current rollout step began.",
            ),
            kd,
        )
        .expect("valid metric");
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
            Box::new(rollout_info.clone()),
            Box::new(rollout_step.clone()),
            Box::new(rollout_traffic.clone()),
            Box::new(rollout_step_started.clone()),
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
            rollout_info,
            rollout_step,
            rollout_traffic,
            rollout_step_started,
            rollout_analysis,
            rollout_rollbacks,
            rollout_duration,
            training_jobs,
        }
    }
}

/// Keeps the leader's series exported; dropping it (when the Lease is lost) withdraws the
/// heartbeats and the rollout gauges, so that a standby exports none of them stale.
pub struct Leading {
    metrics: Metrics,
    heartbeats: Heartbeats,
}

impl Drop for Leading {
    fn drop(&mut self) {
        let m = &self.metrics;
        let _ = m.registry.unregister(Box::new(self.heartbeats.clone()));
        for g in [&m.rollout_info, &m.rollout_step, &m.rollout_traffic] {
            g.reset();
        }
        m.rollout_step_started.reset();
    }
}

/// Each node's last report time, read from the report cache at scrape time so that a
/// report that goes away takes its series with it.
#[derive(Clone)]
struct Heartbeats {
    reports: Store<NodeReport>,
    desc: Vec<Desc>,
}

impl Heartbeats {
    fn gauge() -> GaugeVec {
        GaugeVec::new(
            Opts::new(
                "node_report_heartbeat_timestamp_seconds",
                "Unix time of each node agent's latest report.",
            ),
            &["node"],
        )
        .expect("valid metric")
    }
}

impl Collector for Heartbeats {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let gauge = Self::gauge();
        for r in self.reports.state() {
            gauge
                .with_label_values(&[&r.spec.node_name])
                .set(r.spec.heartbeat_time.0.as_millisecond() as f64 / 1e3);
        }
        gauge.collect()
    }
}

impl Metrics {
    /// Exports the heartbeat of every node report in `reports`, and the rollout gauges as the
    /// controller sets them, until the returned guard is dropped.
    /// One guard at a time: the previous term's, dropped, has withdrawn its collector.
    pub fn lead(&self, reports: Store<NodeReport>) -> Leading {
        let desc = Heartbeats::gauge().desc().into_iter().cloned().collect();
        let heartbeats = Heartbeats { reports, desc };
        self.registry
            .register(Box::new(heartbeats.clone()))
            .expect("the previous term's collector is gone");
        Leading {
            metrics: self.clone(),
            heartbeats,
        }
    }

    /// Sets the gauges of one KernelDeployment's rollout from its status.
    pub fn rollout(&self, namespace: &str, name: &str, status: &KernelDeploymentStatus) {
        for phase in PHASES {
            let phase_label = format!("{phase:?}");
            let labels = [namespace, name, phase_label.as_str()];
            if phase == status.phase {
                self.rollout_info.with_label_values(&labels).set(1);
            } else {
                let _ = self.rollout_info.remove_label_values(&labels);
            }
        }
        let kd = [namespace, name];
        self.rollout_step
            .with_label_values(&kd)
            .set(status.current_step_index.map_or(-1, i64::from));
        self.rollout_traffic
            .with_label_values(&kd)
            .set(status.traffic_percent.into());
        match &status.step_start_time {
            Some(t) => self
                .rollout_step_started
                .with_label_values(&kd)
                .set(t.0.as_millisecond() as f64 / 1e3),
            // No step now: the previous rollout's last one must not linger.
            None => drop(self.rollout_step_started.remove_label_values(&kd)),
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

    /// Drops every series of a deleted KernelDeployment.
    pub fn forget_rollout(&self, namespace: &str, name: &str) {
        for phase in PHASES {
            let phase_label = format!("{phase:?}");
            let _ = self
                .rollout_info
                .remove_label_values(&[namespace, name, phase_label.as_str()]);
        }
        for result in ["pass", "fail", "inconclusive"] {
            let _ = self
                .rollout_analysis
                .remove_label_values(&[namespace, name, result]);
        }
        for g in [&self.rollout_step, &self.rollout_traffic] {
            let _ = g.remove_label_values(&[namespace, name]);
        }
        let _ = self
            .rollout_step_started
            .remove_label_values(&[namespace, name]);
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

    use super::*;

    #[test]
    fn leadership_lost_withdraws_the_leaders_series() {
        let m = Metrics::default();
        let leading = m.lead(kube::runtime::reflector::store::<NodeReport>().0);
        m.rollout("ns", "k", &KernelDeploymentStatus::default());
        assert!(m.render().contains("rollout_info{"));
        drop(leading);
        assert!(!m.render().contains("rollout_info{"));
        // Leading again registers the heartbeats anew.
        let _again = m.lead(kube::runtime::reflector::store::<NodeReport>().0);
    }

    #[test]
    fn a_step_start_goes_when_the_rollout_has_no_step() {
        let m = Metrics::default();
        let mut status = KernelDeploymentStatus {
            step_start_time: Some(Time(Timestamp::from_second(1_800_000_000).unwrap())),
            ..Default::default()
        };
        m.rollout("ns", "k", &status);
        assert!(
            m.render()
                .contains("step_started_timestamp_seconds{name=\"k\"")
        );
        status.step_start_time = None;
        m.rollout("ns", "k", &status);
        assert!(
            !m.render()
                .contains("step_started_timestamp_seconds{name=\"k\"")
        );
    }
}
