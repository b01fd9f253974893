//! Prometheus metrics of the operator, on its own registry.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The operator's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub reconciliations: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub leader: IntGauge,
    pub admission_reviews: IntCounterVec,
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
        for m in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(leader.clone()),
            Box::new(admission_reviews.clone()),
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
        }
    }
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}
