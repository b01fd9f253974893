//! Checkpoints: a worker's model and optimiser state after a step, so that a worker stopped
//! by a crash, a suspension or a move to another node resumes where it left off.
//!
//! A checkpoint is one file, `<dir>/<job uid>/worker-<index>.ckpt`: a header line
//! `kernelflow-checkpoint <sha256>` and a safetensors body (the model's state dict; the step,
//! first loss and spec fingerprint in its metadata). It is written to a temporary name,
//! fsynced, renamed over the previous one and the directory fsynced, so a crash leaves the
//! old checkpoint or the new one, never a torn one; the digest is checked on every load, so
//! a file damaged on disk is refused instead of trained on.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use sha2::{Digest, Sha256};

use crate::artifact::format::{f32_bytes, f32s, sha256_hex};
use crate::compute::train::Model;
use crate::files::{self, Unread};

const MAGIC: &str = "kernelflow-checkpoint";
const FORMAT: &str = "kernelflow.checkpoint.v1";

/// What a checkpoint records besides the tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// Steps completed.
    pub step: u64,
    /// Loss of the run's first step.
    pub first_loss: Option<f32>,
    /// Digest of everything in the spec that the weights depend on; a checkpoint of another
    /// spec is not resumed from.
    pub fingerprint: String,
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Loaded {
    pub meta: Meta,
    pub tensors: HashMap<String, Vec<f32>>,
}

/// Why a checkpoint could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the checkpoint is corrupt: {0}")]
    Corrupt(String),
    #[error("not a valid job uid for a checkpoint path: {0:?}")]
    BadUid(String),
}

impl CheckpointError {
    /// A short, stable label for metrics and reports.
    pub fn reason(&self) -> &'static str {
        match self {
            CheckpointError::Io(_) => "Io",
            CheckpointError::Corrupt(_) => "Corrupt",
            CheckpointError::BadUid(_) => "BadUid",
        }
    }
}

/// Where this node keeps checkpoints: a directory (node disk, or storage shared between
/// nodes so that a worker moved elsewhere resumes too), or memory when the agent has none.
pub struct Checkpoints {
    dir: Option<PathBuf>,
    memory: Mutex<HashMap<PathBuf, Vec<u8>>>,
}

impl Checkpoints {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            memory: Mutex::default(),
        }
    }

    /// The checkpoint's path, relative to the directory.
    fn path(uid: &str, index: u32) -> Result<PathBuf, CheckpointError> {
        // Only uid-shaped names reach the file system.
        if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(CheckpointError::BadUid(uid.into()));
        }
        Ok(Path::new(uid).join(format!("worker-{index}.ckpt")))
    }

    /// Writes the checkpoint of worker `index` of job `uid`, replacing the previous one.
    pub fn save(
        &self,
        uid: &str,
        index: u32,
        meta: &Meta,
        model: &Model,
    ) -> Result<(), CheckpointError> {
        let path = Self::path(uid, index)?;
        let bytes = encode(meta, model)?;
        let Some(dir) = &self.dir else {
            self.memory.lock().expect("memory lock").insert(path, bytes);
            return Ok(());
        };
        let path = dir.join(path);
        let parent = path.parent().expect("a job directory");
        fs::create_dir_all(parent)?;
        // Another writer of this worker (a run being replaced, or the agent of another node
        // sharing the directory) may be writing it at the same time.
        crate::files::replace(&path, &format!("worker-{index}"), &bytes)?;
        Ok(())
    }

    /// The checkpoint of worker `index` of job `uid`, if there is one, read only if it is a
    /// regular file of at most `max_bytes` ([`Checkpoints::room`] of its model).
    pub fn load(
        &self,
        uid: &str,
        index: u32,
        max_bytes: usize,
    ) -> Result<Option<Loaded>, CheckpointError> {
        let path = Self::path(uid, index)?;
        let bytes = match &self.dir {
            None => self.memory.lock().expect("memory lock").get(&path).cloned(),
            Some(dir) => match files::read_bounded(&dir.join(path), max_bytes) {
                Ok(b) => Some(b),
                Err(Unread::Unreadable(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(Unread::Unreadable(e)) => return Err(e.into()),
                Err(Unread::Unfit) => {
                    return Err(CheckpointError::Corrupt(format!(
                        "not a regular file of at most {max_bytes} bytes"
                    )));
                }
            },
        };
        bytes.map(|b| decode(&b)).transpose()
    }

    /// The most bytes a checkpoint of `model` takes: its state, and room for the headers.
    pub fn room(model: &Model) -> usize {
        let values: usize = model.state_dict().iter().map(|(_, v)| v.len()).sum();
        values.saturating_mul(4).saturating_add(1 << 20)
    }

    /// Deletes the checkpoints of jobs not in `live`, once untouched for `min_age` (a job
    /// created a moment ago may not have reached this agent's cache yet).
    pub fn retain(&self, live: &HashSet<String>, min_age: Duration) -> std::io::Result<()> {
        let Some(dir) = &self.dir else {
            self.memory.lock().expect("memory lock").retain(|p, _| {
                p.iter()
                    .next()
                    .is_some_and(|uid| live.contains(&*uid.to_string_lossy()))
            });
            return Ok(());
        };
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Only what a job could have written: the directory may hold others' files.
            if Self::path(&name, 0).is_err() {
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or_default() >= min_age);
            if !live.contains(&name) && old {
                tracing::info!(uid = name, "deleting checkpoints of a job that is gone");
                fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }
}

fn encode(meta: &Meta, model: &Model) -> Result<Vec<u8>, CheckpointError> {
    let state = model.state_dict();
    let data: Vec<(String, Vec<u8>, usize)> = state
        .into_iter()
        .map(|(name, v)| (name, f32_bytes(v), v.len()))
        .collect();
    let views = data
        .iter()
        .map(|(name, bytes, len)| {
            TensorView::new(Dtype::F32, vec![*len], bytes).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
    let metadata: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("step", meta.step.to_string()),
        ("fingerprint", meta.fingerprint.clone()),
    ]
    .into_iter()
    .chain(meta.first_loss.map(|l| ("first_loss", l.to_string())))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let body = safetensors::serialize(views, Some(metadata))
        .map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
    let mut out = format!("{MAGIC} {}\n", sha256_hex(&body)).into_bytes();
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode(bytes: &[u8]) -> Result<Loaded, CheckpointError> {
    let corrupt = |why: &str| CheckpointError::Corrupt(why.into());
    let newline = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| corrupt("no header line"))?;
    let header =
        std::str::from_utf8(&bytes[..newline]).map_err(|_| corrupt("header is not text"))?;
    let digest = header
        .strip_prefix(MAGIC)
        .and_then(|d| d.strip_prefix(' '))
        .ok_or_else(|| corrupt("not a kernelflow checkpoint"))?;
    let body = &bytes[newline + 1..];
    if sha256_hex(body) != digest {
        return Err(corrupt("its bytes do not match the digest in its header"));
    }
    let tensors =
        SafeTensors::deserialize(body).map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
    let (_, header) =
        SafeTensors::read_metadata(body).map_err(|e| CheckpointError::Corrupt(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(corrupt("unknown format"));
    }
    let step = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt("no step"))?;
    let first_loss = meta.get("first_loss").and_then(|s| s.parse().ok());
    let fingerprint = meta.get("fingerprint").cloned().unwrap_or_default();
    let tensors = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| match view.dtype() {
            Dtype::F32 => Ok((name, f32s(view.data()))),
            other => Err(corrupt(&format!("tensor {name} is {other:?}, not F32"))),
        })
        .collect::<Result<_, _>>()?;
    Ok(Loaded {
        meta: Meta {
            step,
            first_loss,
            fingerprint,
        },
        tensors,
    })
}

/// SHA-256 of a model's weights: every layer's weight then bias, f32 little-endian.
pub fn weights_digest(model: &Model) -> String {
    let mut h = Sha256::new();
    for layer in &model.layers {
        h.update(f32_bytes(&layer.weight));
        h.update(f32_bytes(&layer.bias));
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernelflow_crds::Conv2dSpec;

    /// Room for the checkpoints of [`model`].
    const ROOM: usize = 1 << 21;

    fn model(seed: u64) -> Model {
        Model::new(&[Conv2dSpec::new(2, 3, [3, 3])], [2, 5, 5], seed).unwrap()
    }

    fn meta(step: u64) -> Meta {
        Meta {
            step,
            first_loss: Some(0.25),
            fingerprint: "f".into(),
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kf-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_checkpoint_round_trips_bit_for_bit_on_disk_and_in_memory() {
        for store in [Checkpoints::new(Some(dir("trip"))), Checkpoints::new(None)] {
            assert!(store.load("u-1", 0, ROOM).unwrap().is_none());
            store.save("u-1", 0, &meta(5), &model(1)).unwrap();
            store.save("u-1", 0, &meta(10), &model(2)).unwrap();
            let loaded = store.load("u-1", 0, ROOM).unwrap().unwrap();
            assert_eq!(loaded.meta, meta(10));
            let mut restored = model(3);
            let mut tensors = loaded.tensors;
            restored.load_state_dict(|k| tensors.remove(k)).unwrap();
            assert_eq!(restored, model(2));
            assert_eq!(weights_digest(&restored), weights_digest(&model(2)));
            assert_ne!(weights_digest(&model(1)), weights_digest(&model(2)));
        }
    }

    #[test]
    fn damaged_files_are_refused_and_uids_cannot_escape() {
        let root = dir("damaged");
        let store = Checkpoints::new(Some(root.clone()));
        store.save("u-2", 1, &meta(5), &model(1)).unwrap();
        let path = root.join("u-2/worker-1.ckpt");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let err = store.load("u-2", 1, ROOM).unwrap_err();
        assert!(err.to_string().contains("do not match the digest"), "{err}");
        fs::write(&path, &bytes[..100]).unwrap();
        assert_eq!(store.load("u-2", 1, ROOM).unwrap_err().reason(), "Corrupt");
        // Larger than its model's checkpoints could be, or no regular file: refused unread.
        fs::write(&path, vec![0; ROOM + 1]).unwrap();
        assert_eq!(store.load("u-2", 1, ROOM).unwrap_err().reason(), "Corrupt");
        fs::remove_file(&path).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        let err = store.load("u-2", 1, ROOM).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        fs::remove_file(&path).unwrap();
        // A path that cannot be read is an error to retry, not a checkpoint to drop.
        fs::write(root.join("u-3"), b"a file where the job's directory goes").unwrap();
        assert_eq!(store.load("u-3", 0, ROOM).unwrap_err().reason(), "Io");
        assert_eq!(
            store
                .save("../x", 0, &meta(1), &model(1))
                .unwrap_err()
                .reason(),
            "BadUid"
        );
        assert!(
            fs::read_dir(root.join("u-2")).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tmp")),
            "no temporary file is left"
        );
    }

    #[test]
    fn checkpoints_of_gone_jobs_are_deleted_once_old() {
        let root = dir("retain");
        let store = Checkpoints::new(Some(root.clone()));
        store.save("live", 0, &meta(1), &model(1)).unwrap();
        store.save("gone", 0, &meta(1), &model(1)).unwrap();
        let live: HashSet<String> = ["live".to_string()].into();
        store.retain(&live, Duration::from_secs(3600)).unwrap();
        assert!(root.join("gone").exists(), "too young to delete");
        fs::create_dir_all(root.join("lost+found")).unwrap();
        store.retain(&live, Duration::ZERO).unwrap();
        assert!(!root.join("gone").exists());
        assert!(
            root.join("lost+found").exists(),
            "only what a job could have written goes"
        );
        assert!(store.load("live", 0, ROOM).unwrap().is_some());
        let memory = Checkpoints::new(None);
        memory.save("gone", 0, &meta(1), &model(1)).unwrap();
        memory.retain(&live, Duration::ZERO).unwrap();
        assert!(memory.load("gone", 0, ROOM).unwrap().is_none());
    }
}
