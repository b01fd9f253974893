//! L1: verified kernels in memory, and their weights on the device, least recently used
//! first out, bounded in bytes.

use std::sync::{Arc, Mutex};

use lru::LruCache;

use super::format::Kernel;
use super::metrics::{CacheMetrics, Tier};

/// An LRU keyed by artifact digest, bounded in bytes: of kernels in memory, or (the device
/// tier) of their weights where the backend computes. Values still held elsewhere (kernels
/// the warmer serves, weights of running lanes) are never evicted, and count: evicting one
/// would free nothing, only lose track of its bytes. So the bound holds for what the cache
/// alone keeps, and its bytes tell all that is resident.
pub struct MemoryCache<V = Arc<Kernel>> {
    inner: Mutex<Inner<V>>,
    capacity: usize,
    tier: Tier,
    metrics: CacheMetrics,
}

struct Inner<V> {
    /// Each value with the bytes it takes.
    lru: LruCache<String, (V, usize)>,
    bytes: usize,
}

/// Memory a kernel's weights take.
pub fn footprint(k: &Kernel) -> usize {
    4 * (k.weight.len() + k.bias.as_ref().map_or(0, |b| b.len()))
}

impl<T> MemoryCache<Arc<T>> {
    pub fn new(capacity: usize, tier: Tier, metrics: CacheMetrics) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity,
            tier,
            metrics,
        }
    }

    /// The value under this digest, marked as recently used.
    pub fn get(&self, digest: &str) -> Option<Arc<T>> {
        let mut inner = self.inner.lock().expect("cache lock");
        let found = inner.lru.get(digest).map(|(v, _)| v.clone());
        self.metrics.count(self.tier, found.is_some());
        found
    }

    /// Inserts `value`, taking `size` bytes, evicting the least recently used of the values
    /// nothing else holds until it fits. A value larger than the whole cache is not kept.
    pub fn insert(&self, digest: String, value: Arc<T>, size: usize) {
        if size > self.capacity {
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock");
        if let Some((_, old)) = inner.lru.put(digest, (value, size)) {
            inner.bytes -= old;
        }
        inner.bytes += size;
        self.evict(&mut inner);
    }

    /// Evicts what has been let go since it was inserted, down to the bound: a node whose
    /// kernels in use went over it gets back within it once they are no longer used.
    pub fn trim(&self) {
        self.evict(&mut self.inner.lock().expect("cache lock"));
    }

    /// Evicts the least recently used of the values nothing else holds while over the bound.
    fn evict(&self, inner: &mut Inner<Arc<T>>) {
        while inner.bytes > self.capacity {
            let unheld = inner.lru.iter().rev();
            let Some(key) = unheld
                .filter(|(_, (v, _))| Arc::strong_count(v) == 1)
                .map(|(k, _)| k.clone())
                .next()
            else {
                break;
            };
            let (_, evicted) = inner.lru.pop(&key).expect("found above");
            inner.bytes -= evicted;
            self.metrics
                .evictions
                .with_label_values(&[self.tier.label()])
                .inc();
        }
        self.metrics
            .bytes
            .with_label_values(&[self.tier.label()])
            .set(inner.bytes as i64);
    }

    /// Bytes held now.
    #[cfg(test)]
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

    fn memory(capacity: usize) -> MemoryCache {
        MemoryCache::new(capacity, Tier::Memory, CacheMetrics::default())
    }

    fn put(cache: &MemoryCache, k: Arc<Kernel>) {
        cache.insert(k.sha256.clone(), k.clone(), footprint(&k));
    }

    #[test]
    fn least_recently_used_goes_first() {
        let cache = memory(400);
        put(&cache, kernel(1, 40));
        put(&cache, kernel(2, 40));
        assert!(cache.get(&kernel(1, 0).sha256).is_some());
        put(&cache, kernel(3, 40)); // 480 bytes: evicts 2, used least recently.
        assert!(cache.contains(&kernel(1, 0).sha256) && cache.contains(&kernel(3, 0).sha256));
        assert!(!cache.contains(&kernel(2, 0).sha256));
        assert_eq!(cache.bytes(), 320);
        put(&cache, kernel(4, 1000)); // Larger than the cache: not kept, nothing evicted.
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

    /// A kernel still served elsewhere is not evicted, and counts: the cache goes over its
    /// bound by what is held, and gets back within it once that is let go.
    #[test]
    fn kernels_held_elsewhere_stay_and_count() {
        let cache = memory(400);
        let held = kernel(1, 60);
        put(&cache, held.clone());
        put(&cache, kernel(2, 40));
        put(&cache, kernel(3, 40)); // 560 bytes: 2 goes, though 1 was used less recently.
        assert!(cache.contains(&held.sha256) && !cache.contains(&kernel(2, 0).sha256));
        put(&cache, kernel(4, 80)); // 3 goes; 1 alone is over the bound's share, and stays.
        assert_eq!(cache.bytes(), 560);
        drop(held);
        cache.trim();
        assert!(
            !cache.contains(&kernel(1, 0).sha256),
            "let go, it is evicted first"
        );
        assert_eq!(cache.bytes(), 320);
    }

    proptest! {
        /// Whatever the sequence, the cache stays within its bound, accounts its bytes
        /// exactly, and keeps the most recently inserted kernel when it fits.
        #[test]
        fn stays_within_its_bound(ops in proptest::collection::vec((0usize..20, 1usize..60, any::<bool>()), 1..200)) {
            let cache = memory(800);
            for (id, params, read) in ops {
                if read {
                    cache.get(&kernel(id, 0).sha256);
                } else {
                    put(&cache, kernel(id, params));
                    prop_assert!(cache.contains(&kernel(id, 0).sha256));
                }
                let inner = cache.inner.lock().unwrap();
                prop_assert!(inner.bytes <= 800);
                prop_assert_eq!(inner.bytes, inner.lru.iter().map(|(_, (k, _))| footprint(k)).sum::<usize>());
            }
        }
    }
}
