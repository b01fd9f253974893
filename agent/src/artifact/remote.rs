//! The remote tier: artifact stores reached through `object_store` (http(s), s3 with the
//! usual AWS credentials chain), with a timeout per attempt, bounded retries with
//! exponential backoff and jitter, and a circuit breaker per store; and `file://` URLs,
//! read beneath the agent's `--file-root` only.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};

use super::format::ArtifactError;
use super::metrics::CacheMetrics;

/// How hard to try a store.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Tries per fetch, the first included.
    pub attempts: u32,
    /// Wait before the first retry; doubles each time, with up to 50% random jitter.
    pub backoff: Duration,
    /// Limit on one attempt, connection to last byte.
    pub attempt_timeout: Duration,
    /// Consecutive failures that open a store's breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker refuses before it lets one probe through.
    pub breaker_cooldown: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_millis(200),
            attempt_timeout: Duration::from_secs(30),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// A circuit breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// Stops hammering a store that keeps failing: opens after `threshold` consecutive
/// failures, refuses for `cooldown`, then lets a single probe through (half-open) whose
/// outcome closes or re-opens it. Time is passed in, so the logic is tested without clocks.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            failures: 0,
            opened_at: None,
            probing: false,
        }
    }

    pub fn state(&self) -> BreakerState {
        match (self.opened_at, self.probing) {
            (None, _) => BreakerState::Closed,
            (Some(_), true) => BreakerState::HalfOpen,
            (Some(_), false) => BreakerState::Open,
        }
    }

    /// Whether a request may go to the store now.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.opened_at {
            None => true,
            Some(at) if !self.probing && now.duration_since(at) >= self.cooldown => {
                self.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    pub fn success(&mut self) {
        *self = Self::new(self.threshold, self.cooldown);
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures += 1;
        if self.probing || self.failures >= self.threshold {
            self.opened_at = Some(now);
            self.probing = false;
        }
    }

    /// A probe that ended without an answer (its fetch was dropped): the next request after
    /// the cool-down probes again, instead of the breaker staying half-open for good.
    pub fn abandon(&mut self) {
        self.probing = false;
    }
}

/// Gives a half-open breaker's probe back if its fetch is dropped before the store answers.
struct Probe<'a>(Option<&'a Mutex<Breaker>>);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.0 {
            breaker.lock().expect("breaker lock").abandon();
        }
    }
}

struct Store {
    client: Arc<dyn ObjectStore>,
    breaker: Mutex<Breaker>,
}

/// Fetches artifacts from their stores.
pub struct Remote {
    policy: RetryPolicy,
    /// The directory `file://` URLs may name files under; none refuses them all.
    file_root: Option<PathBuf>,
    stores: Mutex<HashMap<String, Arc<Store>>>,
    metrics: CacheMetrics,
}

/// Splits a URL into its store (scheme and authority) and the object's path.
fn split(url: &str) -> Result<(String, String, String), ArtifactError> {
    let bad = || ArtifactError::FetchFailed(format!("unsupported artifact URL {url:?}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !matches!(scheme, "file" | "http" | "https" | "s3") || path.is_empty() {
        return Err(bad());
    }
    Ok((scheme.to_string(), authority.to_string(), path.to_string()))
}

impl Remote {
    pub fn new(policy: RetryPolicy, file_root: Option<PathBuf>, metrics: CacheMetrics) -> Self {
        Self {
            policy,
            file_root,
            stores: Mutex::default(),
            metrics,
        }
    }

    fn store(&self, scheme: &str, authority: &str) -> Result<(String, Arc<Store>), ArtifactError> {
        let key = format!("{scheme}://{authority}");
        let mut stores = self.stores.lock().expect("stores lock");
        if let Some(s) = stores.get(&key) {
            return Ok((key, s.clone()));
        }
        let options = ClientOptions::new()
            .with_timeout(self.policy.attempt_timeout)
            .with_connect_timeout(Duration::from_secs(5))
            .with_allow_http(true);
        // Retries are ours (counted by the breaker), not the client's.
        let retry = RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        };
        let build =
            |e: object_store::Error| ArtifactError::FetchFailed(format!("configuring {key}: {e}"));
        let client: Arc<dyn ObjectStore> = match scheme {
            "http" | "https" => Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(key.clone())
                    .with_client_options(options)
                    .with_retry(retry)
                    .build()
                    .map_err(build)?,
            ),
            _ => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(authority)
                    .with_client_options(options)
                    .with_retry(retry)
                    .build()
                    .map_err(build)?,
            ),
        };
        let store = Arc::new(Store {
            client,
            breaker: Mutex::new(Breaker::new(
                self.policy.breaker_threshold,
                self.policy.breaker_cooldown,
            )),
        });
        stores.insert(key.clone(), store.clone());
        Ok((key, store))
    }

    /// The bytes at `url`, at most `max_bytes` of them.
    pub async fn fetch(&self, url: &str, max_bytes: usize) -> Result<Vec<u8>, ArtifactError> {
        let (scheme, authority, path) = split(url)?;
        if scheme == "file" {
            return self.fetch_local(url, &path, max_bytes).await;
        }
        let (key, store) = self.store(&scheme, &authority)?;
        let location =
            StorePath::parse(&path).map_err(|e| ArtifactError::FetchFailed(e.to_string()))?;
        let started = Instant::now();
        let mut last = None;
        for attempt in 0..self.policy.attempts.max(1) {
            if attempt > 0 {
                tokio::time::sleep(backoff(self.policy.backoff, attempt)).await;
            }
            let probing = {
                let mut breaker = store.breaker.lock().expect("breaker lock");
                breaker
                    .allow(Instant::now())
                    .then(|| breaker.state() == BreakerState::HalfOpen)
            };
            let Some(probing) = probing else {
                self.publish(&key, &store);
                return Err(ArtifactError::StoreUnavailable(format!(
                    "{key}: {}",
                    last.map_or("too many failures".into(), |e: ArtifactError| e.to_string())
                )));
            };
            let mut probe = Probe(probing.then_some(&store.breaker));
            let result = match tokio::time::timeout(
                self.policy.attempt_timeout,
                get(store.client.as_ref(), &location, max_bytes),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(ArtifactError::FetchFailed(format!(
                    "no complete answer in {:?}",
                    self.policy.attempt_timeout
                ))),
            };
            // Answered: the outcome below settles the probe.
            probe.0 = None;
            match result {
                Ok(bytes) => {
                    store.breaker.lock().expect("breaker lock").success();
                    self.publish(&key, &store);
                    self.metrics
                        .fetch_seconds
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(bytes);
                }
                // A missing or oversized object is the artifact's fault, not the store's: the
                // store answered, so the breaker counts a success, and retrying cannot help.
                Err(e @ (ArtifactError::TooLarge { .. } | ArtifactError::NotFound(_))) => {
                    store.breaker.lock().expect("breaker lock").success();
                    self.publish(&key, &store);
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(url, attempt, error = %e, "fetch attempt failed");
                    store
                        .breaker
                        .lock()
                        .expect("breaker lock")
                        .failure(Instant::now());
                    self.publish(&key, &store);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| ArtifactError::FetchFailed("no attempt made".into())))
    }

    /// A `file://` URL's bytes, read beneath the file root within one attempt's time: a
    /// local file needs neither retries nor a breaker, and a read that hangs (a dead network
    /// file system) is left to its blocking thread.
    async fn fetch_local(
        &self,
        url: &str,
        path: &str,
        max_bytes: usize,
    ) -> Result<Vec<u8>, ArtifactError> {
        let Some(root) = self.file_root.clone() else {
            return Err(ArtifactError::Forbidden(format!(
                "{url}: file:// artifacts are off on this agent (it has no --file-root)"
            )));
        };
        let (url, path) = (url.to_string(), path.to_string());
        let read = tokio::task::spawn_blocking(move || read_beneath(&root, &path, &url, max_bytes));
        match tokio::time::timeout(self.policy.attempt_timeout, read).await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => Err(ArtifactError::FetchFailed(format!("reading stopped: {e}"))),
            Err(_) => Err(ArtifactError::FetchFailed(format!(
                "no complete answer in {:?}",
                self.policy.attempt_timeout
            ))),
        }
    }

    fn publish(&self, key: &str, store: &Store) {
        let open = store.breaker.lock().expect("breaker lock").state() != BreakerState::Closed;
        self.metrics
            .breaker_open
            .with_label_values(&[key])
            .set(i64::from(open));
    }

    /// The breaker state of the store serving `url`, if it was used.
    #[cfg(test)]
    pub fn breaker(&self, url: &str) -> Option<BreakerState> {
        let (scheme, authority, _) = split(url).ok()?;
        let stores = self.stores.lock().expect("stores lock");
        Some(
            stores
                .get(&format!("{scheme}://{authority}"))?
                .breaker
                .lock()
                .expect("breaker lock")
                .state(),
        )
    }
}

/// Reads the file `path` names (`url`'s path, from `/`) if it lies beneath `root`: opened by
/// `openat2` with `RESOLVE_BENEATH` from the root's directory, so that no `..`, absolute
/// path or link leads out of it however the tree changes meanwhile (relative links that
/// stay beneath it are followed; absolute ones never), and without blocking,
/// so that a FIFO cannot hold the thread; what was opened must be a regular file of at
/// most `max` bytes. A name out of the root is refused before anything is looked up, and
/// whatever is missing or out of reach below it is `NotFound` alike: no answer tells what
/// lies out of the root.
fn read_beneath(root: &Path, path: &str, url: &str, max: usize) -> Result<Vec<u8>, ArtifactError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use rustix::io::Errno;
    let real_root = std::fs::canonicalize(root).map_err(|e| {
        ArtifactError::FetchFailed(format!("the --file-root {}: {e}", root.display()))
    })?;
    let named = Path::new("/").join(path);
    let rel = named
        .strip_prefix(root)
        .or_else(|_| named.strip_prefix(&real_root))
        .ok()
        .filter(|rel| !rel.components().any(|c| c == Component::ParentDir))
        .ok_or_else(|| {
            let root = root.display();
            ArtifactError::Forbidden(format!("{url}: not under the agent's --file-root {root}"))
        })?;
    let not_found =
        || ArtifactError::NotFound(format!("{url} (no regular file under the file root)"));
    let dir = std::fs::File::open(&real_root).map_err(|e| {
        ArtifactError::FetchFailed(format!("the --file-root {}: {e}", root.display()))
    })?;
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    let fd =
        rustix::fs::openat2(&dir, rel, flags, Mode::empty(), resolve).map_err(|e| match e {
            Errno::NOSYS => ArtifactError::FetchFailed(
                "file:// artifacts need Linux 5.6 or later (openat2)".into(),
            ),
            Errno::ACCESS | Errno::PERM => ArtifactError::FetchFailed(format!("{url}: {e}")),
            _ => not_found(),
        })?;
    let file = std::fs::File::from(fd);
    let size = match file.metadata() {
        Ok(m) if m.is_file() => m.len(),
        _ => return Err(not_found()),
    };
    let too_large = |size| ArtifactError::TooLarge {
        size,
        limit: max as u64,
    };
    if size > max as u64 {
        return Err(too_large(size));
    }
    crate::files::read_opened(file, max).map_err(|e| match e {
        // It grew past the limit while read.
        crate::files::Unread::Unfit => too_large(max as u64 + 1),
        crate::files::Unread::Unreadable(e) => ArtifactError::FetchFailed(format!("{url}: {e}")),
    })
}

async fn get(
    store: &dyn ObjectStore,
    location: &StorePath,
    max_bytes: usize,
) -> Result<Vec<u8>, ArtifactError> {
    let fail = |e: object_store::Error| ArtifactError::FetchFailed(e.to_string());
    let result = store.get(location).await.map_err(|e| match e {
        object_store::Error::NotFound { path, .. } => ArtifactError::NotFound(path),
        e => fail(e),
    })?;
    let declared = result.meta.size;
    if declared > max_bytes as u64 {
        return Err(ArtifactError::TooLarge {
            size: declared,
            limit: max_bytes as u64,
        });
    }
    let mut body = Vec::with_capacity(declared as usize);
    let mut stream = result.into_stream();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk.map_err(fail)?);
        if body.len() > max_bytes {
            return Err(ArtifactError::TooLarge {
                size: body.len() as u64,
                limit: max_bytes as u64,
            });
        }
    }
    if body.len() as u64 != declared {
        return Err(ArtifactError::FetchFailed(format!(
            "truncated: {} of {declared} bytes",
            body.len()
        )));
    }
    Ok(body)
}

/// `base * 2^(attempt-1)`, plus up to 50% jitter so that agents do not retry in step.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1 << (attempt - 1).min(10));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    exp + exp.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_probes_and_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(5, Duration::from_secs(30));
        for _ in 0..4 {
            assert!(b.allow(t0));
            b.failure(t0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allow(t0 + Duration::from_secs(29)));
        assert!(
            b.allow(t0 + Duration::from_secs(30)),
            "one probe after the cool-down"
        );
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(
            !b.allow(t0 + Duration::from_secs(30)),
            "only one probe at a time"
        );
        b.failure(t0 + Duration::from_secs(31));
        assert_eq!(b.state(), BreakerState::Open, "a failed probe re-opens");
        assert!(!b.allow(t0 + Duration::from_secs(60)));
        assert!(b.allow(t0 + Duration::from_secs(61)));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allow(t0 + Duration::from_secs(61)));
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_one_through() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_secs(30));
        b.failure(t0);
        assert!(b.allow(t0 + Duration::from_secs(30)));
        b.abandon();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.allow(t0 + Duration::from_secs(30)), "a new probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn backoff_grows_with_bounded_jitter() {
        let base = Duration::from_millis(100);
        for attempt in 1..5 {
            let d = backoff(base, attempt);
            let exp = base * (1 << (attempt - 1));
            assert!(
                d >= exp && d <= exp.mul_f64(1.5),
                "attempt {attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn urls_split_into_store_and_path() {
        assert_eq!(
            split("s3://bucket/a/b.safetensors").unwrap(),
            ("s3".into(), "bucket".into(), "a/b.safetensors".into())
        );
        assert_eq!(
            split("file:///var/k").unwrap(),
            ("file".into(), "".into(), "var/k".into())
        );
        assert!(split("ftp://host/k").is_err());
        assert!(split("http://host").is_err());
    }
}
