//! L2: artifacts on the node's disk, content-addressed by digest, bounded in bytes (least
//! recently used out). Files are written to a temporary name, fsynced and renamed, so a crash
//! never leaves a partial file under a digest's name; a file whose bytes no longer match its
//! name is deleted. Survives agent restarts: a restarted agent is warm at once.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kernelflow_crds::validate::is_sha256;

use super::format::sha256_hex;
use super::metrics::{CacheMetrics, Tier};
use crate::files::Unread::{Unfit, Unreadable};
use crate::files::read_bounded;

/// The disk tier, rooted at a directory of its own.
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    metrics: CacheMetrics,
}

impl DiskCache {
    /// Opens (creating) the cache under `root`, removing temporary files a crash left.
    pub fn open(root: &Path, capacity: u64, metrics: CacheMetrics) -> std::io::Result<Self> {
        let dir = root.join("sha256");
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        let cache = Self {
            dir,
            capacity,
            metrics,
        };
        cache.publish_size()?;
        Ok(cache)
    }

    fn path(&self, digest: &str) -> Option<PathBuf> {
        // Only well-formed digests name files: nothing else can reach the file system.
        is_sha256(digest).then(|| self.dir.join(digest))
    }

    /// The artifact's bytes if they are here, at most `max` long, and still match their digest.
    pub fn get(&self, digest: &str, max: usize) -> Option<Vec<u8>> {
        let path = self.path(digest)?;
        let found = match read_bounded(&path, max) {
            Ok(bytes) if sha256_hex(&bytes) == digest => {
                self.touch(digest);
                Some(bytes)
            }
            Ok(_) | Err(Unfit) => {
                tracing::warn!(
                    digest,
                    "cached artifact no longer matches its digest, or is no regular file of its size; deleting it"
                );
                let _ = fs::remove_file(&path);
                let _ = self.publish_size();
                None
            }
            Err(Unreadable(_)) => None,
        };
        self.metrics.count(Tier::Disk, found.is_some());
        found
    }

    /// Marks the artifact used now: the modification time orders eviction. A kernel served
    /// from memory for days is touched by its holder, or it would go first.
    pub fn touch(&self, digest: &str) {
        // A regular file only: opening a FIFO planted here would block.
        if let Some(path) = self
            .path(digest)
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        {
            let _ = File::options()
                .append(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
        }
    }

    /// Stores verified bytes under their digest, then evicts down to the capacity.
    pub fn put(&self, digest: &str, bytes: &[u8]) -> std::io::Result<()> {
        let Some(path) = self.path(digest) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a sha256 digest",
            ));
        };
        if bytes.len() as u64 > self.capacity {
            return Ok(());
        }
        // Another URL of the same bytes may be putting it at the same time.
        crate::files::replace(&path, digest, bytes)?;
        self.evict(digest)?;
        self.publish_size()
    }

    fn entries(&self) -> std::io::Result<Vec<(PathBuf, u64, SystemTime)>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                continue;
            }
            // Gone meanwhile (evicted by another put, or deleted as corrupt): skipped.
            if let Ok(meta) = entry.metadata() {
                out.push((entry.path(), meta.len(), meta.modified()?));
            }
        }
        Ok(out)
    }

    fn evict(&self, keep: &str) -> std::io::Result<()> {
        let mut entries = self.entries()?;
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort_by_key(|e| e.2);
        for (path, size, _) in entries {
            if total <= self.capacity {
                break;
            }
            if path.file_name().is_some_and(|n| n == keep) {
                continue;
            }
            match fs::remove_file(&path) {
                Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
                // Removed here or by a concurrent eviction: gone either way.
                _ => total -= size,
            }
            self.metrics
                .evictions
                .with_label_values(&[Tier::Disk.label()])
                .inc();
        }
        Ok(())
    }

    fn publish_size(&self) -> std::io::Result<()> {
        let total: u64 = self.entries()?.iter().map(|e| e.1).sum();
        self.metrics
            .bytes
            .with_label_values(&[Tier::Disk.label()])
            .set(total as i64);
        Ok(())
    }

    /// Bytes held now.
    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.entries()
            .map(|e| e.iter().map(|e| e.1).sum())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "kf-disk-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn stores_verifies_and_survives_reopening() {
        let root = dir();
        let bytes = b"kernel bytes".to_vec();
        let digest = sha256_hex(&bytes);
        let cache = DiskCache::open(&root, 1 << 20, CacheMetrics::default()).unwrap();
        assert_eq!(cache.get(&digest, MAX), None);
        cache.put(&digest, &bytes).unwrap();
        drop(cache);
        // A crash mid-write leaves only a temporary file, removed on open.
        fs::write(
            root.join("sha256").join(format!(".tmp-{digest}-1")),
            b"partial",
        )
        .unwrap();
        let reopened = DiskCache::open(&root, 1 << 20, CacheMetrics::default()).unwrap();
        assert_eq!(reopened.get(&digest, MAX), Some(bytes));
        assert_eq!(fs::read_dir(root.join("sha256")).unwrap().count(), 1);
    }

    #[test]
    fn a_corrupted_file_is_deleted() {
        let root = dir();
        let cache = DiskCache::open(&root, 1 << 20, CacheMetrics::default()).unwrap();
        let digest = sha256_hex(b"good");
        cache.put(&digest, b"good").unwrap();
        fs::write(root.join("sha256").join(&digest), b"evil").unwrap();
        assert_eq!(cache.get(&digest, MAX), None);
        assert!(!root.join("sha256").join(&digest).exists());
    }

    #[test]
    fn links_fifos_and_oversized_files_are_deleted_unread() {
        let root = dir();
        let cache = DiskCache::open(&root, 1 << 40, CacheMetrics::default()).unwrap();
        let digest = sha256_hex(b"good");
        let path = root.join("sha256").join(&digest);
        let check = |what: &str| {
            assert_eq!(cache.get(&digest, MAX), None, "{what}");
            assert!(fs::symlink_metadata(&path).is_err(), "{what} not deleted");
        };
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        check("a link to /dev/zero");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        check("a FIFO");
        File::create(&path).unwrap().set_len(1 << 40).unwrap();
        check("a sparse 1 TiB file");
        cache.put(&digest, b"good").unwrap();
        assert_eq!(cache.get(&digest, 3), None);
        assert!(!path.exists());
    }

    #[test]
    fn concurrent_puts_of_one_digest_never_collide() {
        let root = dir();
        let cache = DiskCache::open(&root, 1 << 20, CacheMetrics::default()).unwrap();
        let bytes = vec![7u8; 64 << 10];
        let digest = sha256_hex(&bytes);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        cache.put(&digest, &bytes).unwrap();
                    }
                });
            }
        });
        assert_eq!(cache.get(&digest, MAX), Some(bytes));
    }

    #[test]
    fn evicts_least_recently_used_down_to_capacity() {
        let root = dir();
        let cache = DiskCache::open(&root, 25, CacheMetrics::default()).unwrap();
        let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10]).collect();
        let digests: Vec<String> = blobs.iter().map(|b| sha256_hex(b)).collect();
        cache.put(&digests[0], &blobs[0]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.put(&digests[1], &blobs[1]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(cache.get(&digests[0], MAX).is_some()); // Now 1 is the least recently used.
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.put(&digests[2], &blobs[2]).unwrap();
        assert!(cache.get(&digests[1], MAX).is_none());
        assert!(cache.get(&digests[0], MAX).is_some() && cache.get(&digests[2], MAX).is_some());
        assert_eq!(cache.bytes(), 20);
        // A touch (a kernel in use from memory) counts as a use too.
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.touch(&digests[0]);
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.put(&digests[1], &blobs[1]).unwrap();
        assert!(
            cache.get(&digests[2], MAX).is_none(),
            "2 was the least recently used"
        );
        assert!(cache.get(&digests[0], MAX).is_some());
    }

    #[test]
    fn only_digests_name_files() {
        let cache = DiskCache::open(&dir(), 1 << 20, CacheMetrics::default()).unwrap();
        assert!(cache.put("../../etc/passwd", b"x").is_err());
        assert_eq!(cache.get("../../etc/passwd", MAX), None);
    }
}
