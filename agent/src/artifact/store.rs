//! The kernel store: memory, then the node's disk, then the artifact's store. Every byte is
//! verified against its digest and validated before a kernel is handed out, and concurrent
//! requests for one digest share a single fetch.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use kernelflow_crds::{ArtifactRef, Conv2dSpec};

use super::disk::DiskCache;
use super::format::{self, ArtifactError, Kernel, Limits};
use super::memory::{MemoryCache, footprint};
use super::metrics::{CacheMetrics, Tier};
use super::remote::{Remote, RetryPolicy};

/// Sizes and policies of the store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    pub memory_bytes: usize,
    /// Directory of the disk tier (a hostPath in the chart); `None` keeps memory only.
    pub disk_dir: Option<PathBuf>,
    pub disk_bytes: u64,
    /// The directory `file://` artifacts and data may be read under; none refuses them.
    pub file_root: Option<PathBuf>,
    pub limits: Limits,
    pub retry: RetryPolicy,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            memory_bytes: 512 << 20,
            disk_dir: None,
            disk_bytes: 10 << 30,
            file_root: None,
            limits: Limits::default(),
            retry: RetryPolicy::default(),
        }
    }
}

type Pending = Shared<BoxFuture<'static, Result<Arc<Kernel>, ArtifactError>>>;

/// Kernels by digest, through the three tiers.
pub struct KernelStore {
    memory: MemoryCache,
    disk: Option<DiskCache>,
    remote: Remote,
    limits: Limits,
    inflight: Mutex<HashMap<String, Pending>>,
    pub metrics: CacheMetrics,
}

impl KernelStore {
    pub fn new(config: StoreConfig, metrics: CacheMetrics) -> std::io::Result<Arc<Self>> {
        let disk = config
            .disk_dir
            .as_deref()
            .map(|d| DiskCache::open(d, config.disk_bytes, metrics.clone()))
            .transpose()?;
        Ok(Arc::new(Self {
            memory: MemoryCache::new(config.memory_bytes, Tier::Memory, metrics.clone()),
            disk,
            remote: Remote::new(config.retry, config.file_root, metrics.clone()),
            limits: config.limits,
            inflight: Mutex::default(),
            metrics,
        }))
    }

    /// A store with the default settings that reads `file://` artifacts under the temporary
    /// directory, where tests write theirs.
    #[cfg(test)]
    pub fn for_tests() -> Arc<Self> {
        let config = StoreConfig {
            file_root: Some(std::env::temp_dir()),
            ..StoreConfig::default()
        };
        Self::new(config, CacheMetrics::default()).expect("a store without a disk tier")
    }

    /// Evicts from memory the kernels let go since, down to the memory bound.
    pub fn trim(&self) {
        self.memory.trim();
    }

    /// Marks the artifacts of `digests` used now on disk, where they are kept (blocking).
    pub fn touch(&self, digests: &[String]) {
        if let Some(disk) = &self.disk {
            digests.iter().for_each(|d| disk.touch(d));
        }
    }

    /// The kernel of `artifact`, validated against the declared `conv2d`.
    pub async fn get(
        self: &Arc<Self>,
        artifact: &ArtifactRef,
        conv2d: &Conv2dSpec,
    ) -> Result<Arc<Kernel>, ArtifactError> {
        if let Some(k) = self
            .memory
            .get(&artifact.sha256)
            .filter(|k| k.conv2d == *conv2d)
        {
            return Ok(k);
        }
        // Per URL: another deployment naming the same digest at a broken URL must not
        // fail this one; whichever fetch succeeds fills the tiers for both.
        let key = format!("{}:{}:{conv2d:?}", artifact.sha256, artifact.url);
        let pending = {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            inflight
                .entry(key.clone())
                .or_insert_with(|| {
                    let (store, artifact, conv2d) =
                        (self.clone(), artifact.clone(), conv2d.clone());
                    async move {
                        let started = Instant::now();
                        // A panic (a bug, found by some artifact) refuses that artifact: it
                        // must not poison the shared load for every later request.
                        let result = AssertUnwindSafe(store.load(&artifact, &conv2d))
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|_| {
                                Err(ArtifactError::Malformed("loading it panicked".into()))
                            })
                            .map(Arc::new);
                        store.loaded(&key, &result, started);
                        result
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        pending.await
    }

    /// Books a load once, whoever awaits it: into memory before it leaves `inflight`, so that
    /// no `get` in between starts it again; its figures counted once.
    fn loaded(&self, key: &str, result: &Result<Arc<Kernel>, ArtifactError>, started: Instant) {
        match result {
            Ok(k) => {
                self.memory
                    .insert(k.sha256.clone(), k.clone(), footprint(k));
                self.metrics
                    .load_seconds
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(e) if !e.retryable() => self
                .metrics
                .validation_failures
                .with_label_values(&[e.reason()])
                .inc(),
            Err(_) => {}
        }
        self.inflight.lock().expect("inflight lock").remove(key);
    }

    async fn load(
        self: &Arc<Self>,
        artifact: &ArtifactRef,
        conv2d: &Conv2dSpec,
    ) -> Result<Kernel, ArtifactError> {
        // Hashing and decoding up to `max_bytes` take a while: off the runtime, like the disk.
        let (store, digest, conv) = (self.clone(), artifact.sha256.clone(), conv2d.clone());
        let cached = tokio::task::spawn_blocking(move || {
            let bytes = store.disk.as_ref()?.get(&digest, store.limits.max_bytes)?;
            // The disk tier checked the digest on read.
            Some(format::parse(&bytes, &digest, &conv, &store.limits))
        })
        .await
        .ok()
        .flatten();
        if let Some(parsed) = cached {
            return parsed;
        }
        let fetched = self
            .remote
            .fetch(&artifact.url, self.limits.max_bytes)
            .await;
        self.metrics.count(Tier::Remote, fetched.is_ok());
        let bytes = fetched?;
        let (store, digest, conv) = (self.clone(), artifact.sha256.clone(), conv2d.clone());
        tokio::task::spawn_blocking(move || {
            let kernel = format::verify(&bytes, &digest, &conv, &store.limits)?;
            if let Some(Err(e)) = store.disk.as_ref().map(|d| d.put(&digest, &bytes)) {
                tracing::warn!(error = %e, digest, "writing the disk cache failed; serving from memory");
            }
            Ok(kernel)
        })
        .await
        .map_err(|e| ArtifactError::Malformed(format!("verifying the artifact stopped: {e}")))?
    }

    /// The remote tier, for breaker state.
    pub fn remote(&self) -> &Remote {
        &self.remote
    }
}
