//! Training data. A batch is a pure function of the data set, the worker and the step, so
//! that a run resumed from a checkpoint sees exactly the batches an uninterrupted run sees.
//!
//! Workers read consecutive slices of one endless stream of sample indices: batch `b` of
//! step `s` on worker `w` of `r` holds positions `((s * r + w) * b) ..` of the stream, taken
//! modulo the number of samples. Workers therefore see disjoint samples within an epoch.

use kernelflow_crds::training_job::SyntheticData;
use kernelflow_crds::{ArtifactRef, Conv2dSpec};
use safetensors::SafeTensors;

use crate::artifact::format::{self, ArtifactError, Limits};
use crate::artifact::remote::Remote;
use crate::compute::ComputeError;
use crate::compute::ops::uniform_at;
use crate::compute::train::Model;

/// Mixed into the data seed to seed the synthetic teacher, so that it differs from a
/// student initialised from the same number.
const TEACHER_SEED: u64 = 0xa076_1d64_78bd_642f;

/// Where batches come from.
#[derive(Debug)]
pub enum Data {
    /// Inputs are values of `uniform(samples * in_size, seed)`, one sample after another;
    /// targets are a fixed random "teacher" model's outputs for them, so the loss can fall.
    Synthetic {
        seed: u64,
        samples: u64,
        in_size: usize,
        teacher: Model,
    },
    /// A data set artifact held in memory.
    Artifact {
        inputs: Vec<f32>,
        targets: Vec<f32>,
        samples: u64,
        in_size: usize,
        out_size: usize,
    },
}

impl Data {
    /// Synthetic data for a model of `layers`. The teacher has the same layers, with weights
    /// from the data seed.
    pub fn synthetic(spec: &SyntheticData, layers: &[Conv2dSpec]) -> Result<Self, ComputeError> {
        let teacher = Model::new(layers, spec.shape, spec.seed ^ TEACHER_SEED)?;
        Ok(Data::Synthetic {
            seed: spec.seed,
            samples: spec.samples,
            in_size: teacher.sample_sizes().0,
            teacher,
        })
    }

    /// Inputs and targets for one step of one worker.
    pub fn batch(
        &self,
        step: u64,
        worker: u32,
        replicas: u32,
        batch: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), ComputeError> {
        let first = (u128::from(step) * u128::from(replicas) + u128::from(worker)) * batch as u128;
        let index = |i: usize, samples: u64| ((first + i as u128) % u128::from(samples)) as u64;
        match self {
            Data::Synthetic {
                seed,
                samples,
                in_size,
                teacher,
            } => {
                let mut x = Vec::with_capacity(batch * in_size);
                for i in 0..batch {
                    let offset = index(i, *samples) * *in_size as u64;
                    x.extend(uniform_at(offset, *in_size, *seed, 1.0));
                }
                let target = teacher.predict(&x, batch, faer::Par::rayon(0))?;
                Ok((x, target))
            }
            Data::Artifact {
                inputs,
                targets,
                samples,
                in_size,
                out_size,
            } => {
                let mut x = Vec::with_capacity(batch * in_size);
                let mut t = Vec::with_capacity(batch * out_size);
                for i in 0..batch {
                    let j = index(i, *samples) as usize;
                    x.extend_from_slice(&inputs[j * in_size..(j + 1) * in_size]);
                    t.extend_from_slice(&targets[j * out_size..(j + 1) * out_size]);
                }
                Ok((x, t))
            }
        }
    }
}

/// A data set artifact: safetensors with F32 `inputs` `[N, C, H, W]` and `targets` `[N, ...]`.
#[derive(Debug)]
pub struct Dataset {
    /// `[C, H, W]` of one input sample.
    pub shape: [u32; 3],
    pub inputs: Vec<f32>,
    pub targets: Vec<f32>,
    pub samples: u64,
}

/// Fetches a data set through the kernel cache's remote tier (retries and circuit breaker),
/// checks its digest and parses it.
pub async fn fetch(
    remote: &Remote,
    artifact: &ArtifactRef,
    limits: &Limits,
) -> Result<Dataset, ArtifactError> {
    let bytes = remote.fetch(&artifact.url, limits.max_bytes).await?;
    let actual = format::sha256_hex(&bytes);
    if actual != artifact.sha256 {
        return Err(ArtifactError::DigestMismatch {
            expected: artifact.sha256.clone(),
            actual,
        });
    }
    parse_dataset(&bytes)
}

fn parse_dataset(bytes: &[u8]) -> Result<Dataset, ArtifactError> {
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| ArtifactError::Malformed(e.to_string()))?;
    let (in_shape, inputs) = format::finite_f32(&tensors, "inputs")?;
    let (out_shape, targets) = format::finite_f32(&tensors, "targets")?;
    let mismatch = |message: String| ArtifactError::TensorMismatch {
        tensor: "inputs".into(),
        message,
    };
    let [n, c, h, w] = in_shape[..] else {
        return Err(mismatch(format!(
            "shape {in_shape:?}; expected [samples, channels, height, width]"
        )));
    };
    if n == 0 || out_shape.first() != Some(&n) {
        return Err(mismatch(format!(
            "{n} samples, but targets have shape {out_shape:?}; both need the same non-zero first dimension"
        )));
    }
    if [c, h, w].contains(&0) {
        return Err(mismatch(format!(
            "shape {in_shape:?}; channels, height and width must be at least 1"
        )));
    }
    let dim = |v: usize| u32::try_from(v).map_err(|_| mismatch(format!("dimension {v} too large")));
    Ok(Dataset {
        shape: [dim(c)?, dim(h)?, dim(w)?],
        inputs,
        targets,
        samples: n as u64,
    })
}

impl Dataset {
    /// The data for `model`, whose output per sample must match the targets'.
    pub fn into_data(self, model: &Model) -> Result<Data, String> {
        let (in_size, out_size) = model.sample_sizes();
        let n = self.samples as usize;
        if self.targets.len() != n * out_size {
            return Err(format!(
                "the data set's targets hold {} values per sample; the model outputs {out_size}",
                self.targets.len() / n
            ));
        }
        Ok(Data::Artifact {
            inputs: self.inputs,
            targets: self.targets,
            samples: self.samples,
            in_size,
            out_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::format::f32_bytes;
    use crate::artifact::metrics::CacheMetrics;
    use crate::artifact::remote::RetryPolicy;
    use safetensors::{Dtype, tensor::TensorView};

    fn layers() -> [Conv2dSpec; 1] {
        [Conv2dSpec {
            padding: [1, 1],
            ..Conv2dSpec::new(2, 3, [3, 3])
        }]
    }

    fn model() -> Model {
        Model::new(&layers(), [2, 4, 4], 1).unwrap()
    }

    fn synthetic() -> Data {
        let spec = SyntheticData {
            shape: [2, 4, 4],
            samples: 10,
            seed: 7,
        };
        Data::synthetic(&spec, &layers()).unwrap()
    }

    #[test]
    fn batches_are_a_function_of_step_and_worker_only() {
        let data = synthetic();
        let a = data.batch(3, 1, 2, 4).unwrap();
        assert_eq!(a, synthetic().batch(3, 1, 2, 4).unwrap());
        assert_ne!(
            a.0,
            data.batch(3, 0, 2, 4).unwrap().0,
            "workers take other samples"
        );
        // Positions 28..32 of the stream are samples 8, 9, 0, 1 of the ten.
        let whole = crate::compute::ops::uniform(10 * 32, 7, 1.0);
        let samples = [8usize, 9, 0, 1].map(|j| whole[j * 32..(j + 1) * 32].to_vec());
        assert_eq!(a.0, samples.concat());
        let Data::Synthetic { teacher, .. } = &data else {
            unreachable!()
        };
        assert_ne!(teacher.layers[0].weight, model().layers[0].weight);
        assert_eq!(a.1, teacher.predict(&a.0, 4, faer::Par::rayon(0)).unwrap());
    }

    fn dataset_bytes(n: usize, out: usize) -> Vec<u8> {
        let inputs = f32_bytes(&crate::compute::ops::uniform(n * 32, 1, 1.0));
        let targets = f32_bytes(&crate::compute::ops::uniform(n * out, 2, 1.0));
        safetensors::serialize(
            [
                (
                    "inputs",
                    TensorView::new(Dtype::F32, vec![n, 2, 4, 4], &inputs).unwrap(),
                ),
                (
                    "targets",
                    TensorView::new(Dtype::F32, vec![n, out], &targets).unwrap(),
                ),
            ],
            None,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn data_set_artifacts_are_fetched_verified_and_checked_against_the_model() {
        let dir = std::env::temp_dir().join(format!("kf-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("data.safetensors");
        let bytes = dataset_bytes(5, 48);
        std::fs::write(&path, &bytes).unwrap();
        let remote = Remote::new(
            RetryPolicy::default(),
            Some(dir.clone()),
            CacheMetrics::default(),
        );
        let artifact = ArtifactRef {
            url: format!("file://{}", path.display()),
            sha256: format::sha256_hex(&bytes),
        };
        let set = fetch(&remote, &artifact, &Limits::default()).await.unwrap();
        assert_eq!((set.shape, set.samples), ([2, 4, 4], 5));
        let data = set.into_data(&model()).unwrap();
        let (x, t) = data.batch(1, 0, 1, 3).unwrap();
        assert_eq!((x.len(), t.len()), (3 * 32, 3 * 48));

        let wrong = ArtifactRef {
            sha256: "0".repeat(64),
            ..artifact
        };
        let err = fetch(&remote, &wrong, &Limits::default())
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "DigestMismatch");
        let narrow = parse_dataset(&dataset_bytes(5, 7)).unwrap();
        assert!(
            narrow
                .into_data(&model())
                .unwrap_err()
                .contains("7 values per sample; the model outputs 48")
        );
    }

    #[test]
    fn data_sets_of_empty_samples_are_refused() {
        let targets = f32_bytes(&[0.0; 2]);
        let bytes = safetensors::serialize(
            [
                (
                    "inputs",
                    TensorView::new(Dtype::F32, vec![2, 2, 0, 4], &[]).unwrap(),
                ),
                (
                    "targets",
                    TensorView::new(Dtype::F32, vec![2, 1], &targets).unwrap(),
                ),
            ],
            None,
        )
        .unwrap();
        let err = parse_dataset(&bytes).unwrap_err();
        assert_eq!(err.reason(), "TensorMismatch");
        assert!(err.to_string().contains("at least 1"), "{err}");
    }
}
