//! Durable file replacement and bounded reads, shared by the kernel disk cache and the
//! checkpoints.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
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

/// Why [`read_bounded`] returned no bytes.
#[derive(Debug)]
pub enum Unread {
    /// Absent, or unreadable: nothing to delete.
    Unreadable(std::io::Error),
    /// Not a regular file (a link, a FIFO, a device), or longer than allowed.
    Unfit,
}
use Unread::{Unfit, Unreadable};

/// Reads a regular file of at most `max` bytes, never more: a file swapped for a link to
/// `/dev/zero`, a FIFO or a sparse giant neither hangs nor exhausts memory.
pub fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, Unread> {
    use rustix::fs::OFlags;
    use std::os::unix::fs::OpenOptionsExt;
    let regular = |m: &fs::Metadata| m.file_type().is_file() && m.len() <= max as u64;
    // Opened without following a link or blocking on a FIFO, then checked: what is checked
    // is what is read, whatever the name points at meanwhile.
    let flags = (OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32;
    let file = match File::options().read(true).custom_flags(flags).open(path) {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            return Err(Unfit);
        }
        Err(e) => return Err(Unreadable(e)),
    };
    if !file.metadata().is_ok_and(|m| regular(&m)) {
        return Err(Unfit);
    }
    read_opened(file, max)
}

/// Reads an opened file's bytes, at most `max` of them: one that grows past them meanwhile
/// is `Unfit`.
pub fn read_opened(file: File, max: usize) -> Result<Vec<u8>, Unread> {
    let mut bytes = Vec::new();
    file.take((max as u64).saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(Unreadable)?;
    if bytes.len() > max {
        return Err(Unfit);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_replacement_leaves_the_old_file_and_no_part() {
        let dir = std::env::temp_dir().join(format!("kf-files-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("f");
        replace(&dest, "t", b"old").unwrap();
        replace(&dest, "t", b"new").unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        // A directory in the way: the rename fails.
        let blocked = dir.join("d");
        fs::create_dir_all(blocked.join("inside")).unwrap();
        assert!(replace(&blocked, "t", b"x").is_err());
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp")), "{names:?}");
        assert_eq!(fs::read(&dest).unwrap(), b"new");
    }
}
