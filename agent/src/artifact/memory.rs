//! L1: verified kernels in memory, least recently used first out, bounded in bytes.

use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::format::Kernel;
use super::metrics::{CacheMetrics, Tier};

/// An LRU of kernels keyed by artifact digest.
pub struct MemoryCache {
    inner: Mutex<Inner>,
    capacity: usize,
    metrics: CacheMetrics,
}

struct Inner {
    lru: LruCache<String, Arc<Kernel>>,
    bytes: usize,
}

/// Memory a kernel takes here.
pub fn footprint(k: &Kernel) -> usize {
    4 * (k.weight.len() + k.bias.as_ref().map_or(0, |b| b.len()))
}

impl MemoryCache {
    pub fn new(capacity: usize, metrics: CacheMetrics) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity,
            metrics,
        }
    }

    /// The kernel with this digest, marked as recently used.
    pub fn get(&self, digest: &str) -> Option<Arc<Kernel>> {
        let found = self
            .inner
            .lock()
            .expect("cache lock")
            .lru
            .get(digest)
            .cloned();
        self.metrics.count(Tier::Memory, found.is_some());
        found
    }

    /// Inserts a kernel, evicting the least recently used until it fits. A kernel larger
    /// than the whole cache is not kept.
    pub fn insert(&self, kernel: Arc<Kernel>) {
        let size = footprint(&kernel);
        if size > self.capacity {
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock");
        if let Some(old) = inner.lru.put(kernel.sha256.clone(), kernel) {
            inner.bytes -= footprint(&old);
        }
        inner.bytes += size;
        while inner.bytes > self.capacity {
            let Some((_, evicted)) = inner.lru.pop_lru() else {
                break;
            };
            inner.bytes -= footprint(&evicted);
            self.metrics
                .evictions
                .with_label_values(&[Tier::Memory.label()])
                .inc();
        }
        self.metrics
            .bytes
            .with_label_values(&[Tier::Memory.label()])
            .set(inner.bytes as i64);
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.inner.lock().expect("cache lock").bytes
    }

    pub fn contains(&self, digest: &str) -> bool {
        self.inner.lock().expect("cache lock").lru.contains(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::format::tests::conv;
    use proptest::prelude::*;

    fn kernel(id: usize, params: usize) -> Arc<Kernel> {
        Arc::new(Kernel {
            sha256: format!("{id:064x}"),
            conv2d: conv(),
            weight: Arc::new(vec![0.0; params]),
            bias: None,
            equivalent_to: None,
            bytes: 4 * params,
        })
    }

    #[test]
    fn least_recently_used_goes_first() {
        let cache = MemoryCache::new(400, CacheMetrics::default());
        cache.insert(kernel(1, 40));
        cache.insert(kernel(2, 40));
        assert!(cache.get(&kernel(1, 0).sha256).is_some());
        cache.insert(kernel(3, 40)); // 480 bytes: evicts 2, used least recently.
        assert!(cache.contains(&kernel(1, 0).sha256) && cache.contains(&kernel(3, 0).sha256));
        assert!(!cache.contains(&kernel(2, 0).sha256));
        assert_eq!(cache.bytes(), 320);
        cache.insert(kernel(4, 1000)); // Larger than the cache: not kept, nothing evicted.
        assert_eq!(cache.bytes(), 320);
        let m = &cache.metrics;
        assert_eq!(
            (
                m.hits.with_label_values(&["memory"]).get(),
                m.evictions.with_label_values(&["memory"]).get()
            ),
            (1, 1)
        );
    }

    proptest! {
        /// Whatever the sequence, the cache stays within its bound, accounts its bytes
        /// exactly, and keeps the most recently inserted kernel when it fits.
        #[test]
        fn stays_within_its_bound(ops in proptest::collection::vec((0usize..20, 1usize..60, any::<bool>()), 1..200)) {
            let cache = MemoryCache::new(800, CacheMetrics::default());
            for (id, params, read) in ops {
                if read {
                    cache.get(&kernel(id, 0).sha256);
                } else {
                    cache.insert(kernel(id, params));
                    prop_assert!(cache.contains(&kernel(id, 0).sha256));
                }
                let inner = cache.inner.lock().unwrap();
                prop_assert!(inner.bytes <= 800);
                prop_assert_eq!(inner.bytes, inner.lru.iter().map(|(_, k)| footprint(k)).sum::<usize>());
            }
        }
    }
}
