//! Metrics of the kernel cache, in Prometheus conventions (base units, `_total`, `_seconds`,
//! `_bytes`), labelled by tier (`device`, `memory`, `disk`, `remote`).

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGaugeVec, Opts, Registry};

/// A cache tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Weights where the backend computes: GPU memory on CUDA; on the CPU the memory tier's
    /// own vectors, shared, not copied.
    Device,
    Memory,
    Disk,
    Remote,
}

impl Tier {
    pub fn label(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Remote => "remote",
        }
    }
}

/// The cache's metrics. Clones share them.
#[derive(Clone)]
pub struct CacheMetrics {
    pub hits: IntCounterVec,
    pub misses: IntCounterVec,
    pub evictions: IntCounterVec,
    pub bytes: IntGaugeVec,
    pub fetch_seconds: Histogram,
    pub load_seconds: Histogram,
    pub breaker_open: IntGaugeVec,
    pub validation_failures: IntCounterVec,
}

impl Default for CacheMetrics {
    fn default() -> Self {
        let tier = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["tier"]).expect("valid metric")
        };
        let buckets = vec![0.000_01, 0.000_1, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0];
        Self {
            hits: tier(
                "kernel_cache_hits_total",
                "Kernel lookups served by a tier.",
            ),
            misses: tier(
                "kernel_cache_misses_total",
                "Kernel lookups a tier could not serve.",
            ),
            evictions: tier(
                "kernel_cache_evictions_total",
                "Kernels evicted from a tier.",
            ),
            bytes: IntGaugeVec::new(
                Opts::new("kernel_cache_bytes", "Bytes held by a tier."),
                &["tier"],
            )
            .expect("valid metric"),
            fetch_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "kernel_fetch_duration_seconds",
                    "Time to fetch an artifact from its store.",
                )
                .buckets(buckets.clone()),
            )
            .expect("valid metric"),
            load_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "kernel_load_duration_seconds",
                    "Time to get a kernel ready, from lookup to loaded.",
                )
                .buckets(buckets),
            )
            .expect("valid metric"),
            breaker_open: IntGaugeVec::new(
                Opts::new(
                    "artifact_store_breaker_open",
                    "1 while a store's circuit breaker is open (or half-open).",
                ),
                &["store"],
            )
            .expect("valid metric"),
            validation_failures: IntCounterVec::new(
                Opts::new(
                    "kernel_validation_failures_total",
                    "Artifacts refused, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        }
    }
}

impl CacheMetrics {
    /// Registers every metric.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.hits.clone()))?;
        registry.register(Box::new(self.misses.clone()))?;
        registry.register(Box::new(self.evictions.clone()))?;
        registry.register(Box::new(self.bytes.clone()))?;
        registry.register(Box::new(self.fetch_seconds.clone()))?;
        registry.register(Box::new(self.load_seconds.clone()))?;
        registry.register(Box::new(self.breaker_open.clone()))?;
        registry.register(Box::new(self.validation_failures.clone()))
    }

    /// Counts a lookup in `tier` as a hit or a miss.
    pub fn count(&self, tier: Tier, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.with_label_values(&[tier.label()]).inc();
    }
}
