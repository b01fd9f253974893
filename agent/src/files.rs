//! Durable file replacement, shared by the kernel disk cache and the checkpoints.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces `dest` with `bytes` so that a crash leaves the old file or the new one, never a
/// part: written to a temporary `.tmp-{tag}-…` beside it, fsynced, renamed, and the
/// directory fsynced. The temporary name is this write's own, so that another writer of the
/// same file (a concurrent write here, or another agent sharing the directory, PID 1 too)
/// never writes into it; it is removed when the write fails, so that a full disk does not
/// fill up with parts.
pub fn replace(dest: &Path, tag: &str, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = dest.parent().expect("a file in a directory");
    let (tmp, mut file) = loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{tag}-{}-{n}", std::process::id()));
        match File::options().write(true).create_new(true).open(&tmp) {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, dest));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}
