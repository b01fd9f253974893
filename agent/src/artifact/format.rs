//! The kernel artifact: a safetensors file with the conv2d `weight` (and `bias`) tensors and
//! the op's parameters in its metadata. It is data, never code: the agent's own backends run
//! it. Everything is checked before use, and each failure is a typed [`ArtifactError`].

use std::collections::HashMap;
use std::sync::Arc;

use kernelflow_crds::{Conv2dSpec, DType};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use sha2::{Digest, Sha256};

/// Value of the `format` metadata key.
pub const FORMAT: &str = "kernelflow.conv2d.v1";

/// Bounds an artifact must stay within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest safetensors header (JSON) accepted.
    pub max_header_bytes: usize,
    /// Largest weight + bias element count accepted.
    pub max_parameters: usize,
    /// Largest artifact accepted, in bytes; fetches stop reading past it.
    pub max_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self::with_parameters(10_000_000)
    }
}

impl Limits {
    /// Limits for artifacts of up to `max_parameters` parameters, with room in bytes for
    /// them all: no less than 64 MiB, which a training job's data artifact is held to too.
    pub fn with_parameters(max_parameters: usize) -> Self {
        let max_header_bytes = 1 << 20;
        let room = max_parameters
            .saturating_mul(4)
            .saturating_add(max_header_bytes + 8);
        Self {
            max_header_bytes,
            max_parameters,
            max_bytes: room.max(64 << 20),
        }
    }
}

/// Why an artifact was refused. `reason()` is the condition reason operators see.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    #[error("sha256 of the artifact is {actual}, not the declared {expected}")]
    DigestMismatch { expected: String, actual: String },
    #[error("the artifact is {size} bytes, over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("the safetensors header claims {claimed} bytes, over the limit of {limit}")]
    HeaderTooLarge { claimed: u64, limit: u64 },
    #[error("not a valid safetensors file: {0}")]
    Malformed(String),
    #[error("the artifact's metadata does not match the declared conv2d: {0}")]
    OpMismatch(String),
    #[error("tensor {tensor}: {message}")]
    TensorMismatch { tensor: String, message: String },
    #[error("{count} parameters, over the limit of {limit}")]
    TooManyParameters { count: u64, limit: u64 },
    #[error("tensor {tensor} holds a non-finite value at index {index}")]
    NonFinite { tensor: String, index: usize },
    #[error("fetching the artifact failed: {0}")]
    FetchFailed(String),
    #[error("the artifact store has no such object: {0}")]
    NotFound(String),
    #[error("the artifact store is unavailable (circuit breaker open): {0}")]
    StoreUnavailable(String),
    #[error("the agent may not read this artifact URL: {0}")]
    Forbidden(String),
}

impl ArtifactError {
    /// A stable CamelCase reason for conditions, reports and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            ArtifactError::DigestMismatch { .. } => "DigestMismatch",
            ArtifactError::TooLarge { .. } => "TooLarge",
            ArtifactError::HeaderTooLarge { .. } => "HeaderTooLarge",
            ArtifactError::Malformed(_) => "Malformed",
            ArtifactError::OpMismatch(_) => "OpMismatch",
            ArtifactError::TensorMismatch { .. } => "TensorMismatch",
            ArtifactError::TooManyParameters { .. } => "TooManyParameters",
            ArtifactError::NonFinite { .. } => "NonFinite",
            ArtifactError::FetchFailed(_) => "FetchFailed",
            ArtifactError::NotFound(_) => "NotFound",
            ArtifactError::StoreUnavailable(_) => "StoreUnavailable",
            ArtifactError::Forbidden(_) => "Forbidden",
        }
    }

    /// Whether fetching again may help (the store, not the artifact, failed).
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ArtifactError::FetchFailed(_)
                | ArtifactError::NotFound(_)
                | ArtifactError::StoreUnavailable(_)
        )
    }
}

/// A verified, validated kernel, ready to load.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub sha256: String,
    pub conv2d: Conv2dSpec,
    /// `[out_channels, in_channels / groups, kernel_h, kernel_w]`, row-major.
    pub weight: Arc<Vec<f32>>,
    pub bias: Option<Arc<Vec<f32>>>,
    /// Digest of an artifact this one declares it computes the same function as.
    pub equivalent_to: Option<String>,
    /// Size of the artifact's bytes.
    pub bytes: usize,
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn pair(v: [u32; 2]) -> String {
    format!("{},{}", v[0], v[1])
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::Bf16 => "bf16",
    }
}

/// Packs a conv2d's weights into an artifact. `weight` is `[K, C/groups, R, S]` row-major.
pub fn pack(
    conv: &Conv2dSpec,
    weight: &[f32],
    bias: Option<&[f32]>,
    equivalent_to: Option<&str>,
) -> Result<Vec<u8>, ArtifactError> {
    let metadata: HashMap<String, String> = [
        ("format", FORMAT.to_string()),
        ("in_channels", conv.in_channels.to_string()),
        ("out_channels", conv.out_channels.to_string()),
        ("kernel_size", pair(conv.kernel_size)),
        ("stride", pair(conv.stride)),
        ("padding", pair(conv.padding)),
        ("dilation", pair(conv.dilation)),
        ("groups", conv.groups.to_string()),
        ("dtype", dtype_name(conv.dtype).to_string()),
    ]
    .into_iter()
    .chain(equivalent_to.map(|e| ("equivalent_to", e.to_string())))
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let (w, b) = (f32_bytes(weight), bias.map(f32_bytes));
    let shape = weight_shape(conv);
    let mut tensors = vec![(
        "weight",
        TensorView::new(Dtype::F32, shape.to_vec(), &w)
            .map_err(|e| ArtifactError::Malformed(e.to_string()))?,
    )];
    if let Some(b) = &b {
        tensors.push((
            "bias",
            TensorView::new(Dtype::F32, vec![conv.out_channels as usize], b)
                .map_err(|e| ArtifactError::Malformed(e.to_string()))?,
        ));
    }
    safetensors::serialize(tensors, Some(metadata))
        .map_err(|e| ArtifactError::Malformed(e.to_string()))
}

fn weight_shape(conv: &Conv2dSpec) -> [usize; 4] {
    [
        conv.out_channels as usize,
        (conv.in_channels / conv.groups.max(1)) as usize,
        conv.kernel_size[0] as usize,
        conv.kernel_size[1] as usize,
    ]
}

/// Verifies `bytes` against the declared digest, then parses and validates them against the
/// declared conv2d and `limits`.
pub fn verify(
    bytes: &[u8],
    sha256: &str,
    declared: &Conv2dSpec,
    limits: &Limits,
) -> Result<Kernel, ArtifactError> {
    if bytes.len() > limits.max_bytes {
        return Err(ArtifactError::TooLarge {
            size: bytes.len() as u64,
            limit: limits.max_bytes as u64,
        });
    }
    let actual = sha256_hex(bytes);
    if actual != sha256 {
        return Err(ArtifactError::DigestMismatch {
            expected: sha256.to_string(),
            actual,
        });
    }
    parse(bytes, sha256, declared, limits)
}

/// Parses and validates bytes already known to match `sha256`.
pub fn parse(
    bytes: &[u8],
    sha256: &str,
    declared: &Conv2dSpec,
    limits: &Limits,
) -> Result<Kernel, ArtifactError> {
    // The header length is checked before the parser sees it, so that a header claiming
    // gigabytes costs nothing.
    let claimed = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| ArtifactError::Malformed("shorter than the 8-byte header length".into()))?;
    if claimed > limits.max_header_bytes as u64 {
        return Err(ArtifactError::HeaderTooLarge {
            claimed,
            limit: limits.max_header_bytes as u64,
        });
    }
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| ArtifactError::Malformed(e.to_string()))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| ArtifactError::Malformed(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    check_metadata(&meta, declared)?;

    let shape = weight_shape(declared);
    // Saturating: a declared shape may multiply past u64 (the API bounds it, the file not).
    let count = shape
        .iter()
        .fold(1u64, |n, &d| n.saturating_mul(d as u64))
        .saturating_add(if declared.bias {
            u64::from(declared.out_channels)
        } else {
            0
        });
    if count > limits.max_parameters as u64 {
        return Err(ArtifactError::TooManyParameters {
            count,
            limit: limits.max_parameters as u64,
        });
    }
    let weight = read_f32(&tensors, "weight", &shape)?;
    let bias = match (declared.bias, tensors.tensor("bias")) {
        (true, _) => Some(read_f32(
            &tensors,
            "bias",
            &[declared.out_channels as usize],
        )?),
        (false, Ok(_)) => {
            return Err(mismatch(
                "bias",
                "present, but the declared conv2d has no bias",
            ));
        }
        (false, Err(_)) => None,
    };
    if let Some(extra) = tensors
        .names()
        .into_iter()
        .find(|n| !["weight", "bias"].contains(n))
    {
        return Err(mismatch(
            extra,
            "unexpected tensor; an artifact holds only weight and bias",
        ));
    }
    Ok(Kernel {
        sha256: sha256.to_string(),
        conv2d: declared.clone(),
        weight: Arc::new(weight),
        bias: bias.map(Arc::new),
        equivalent_to: meta.get("equivalent_to").cloned(),
        bytes: bytes.len(),
    })
}

fn mismatch(tensor: &str, message: impl Into<String>) -> ArtifactError {
    ArtifactError::TensorMismatch {
        tensor: tensor.to_string(),
        message: message.into(),
    }
}

fn check_metadata(meta: &HashMap<String, String>, c: &Conv2dSpec) -> Result<(), ArtifactError> {
    let expected = [
        ("format", FORMAT.to_string()),
        ("in_channels", c.in_channels.to_string()),
        ("out_channels", c.out_channels.to_string()),
        ("kernel_size", pair(c.kernel_size)),
        ("stride", pair(c.stride)),
        ("padding", pair(c.padding)),
        ("dilation", pair(c.dilation)),
        ("groups", c.groups.to_string()),
        ("dtype", dtype_name(c.dtype).to_string()),
    ];
    for (key, want) in expected {
        match meta.get(key) {
            Some(got) if *got == want => {}
            Some(got) => {
                return Err(ArtifactError::OpMismatch(format!(
                    "{key} is {got}, the KernelDeployment declares {want}"
                )));
            }
            None => {
                return Err(ArtifactError::OpMismatch(format!(
                    "metadata lacks {key} (expected {want})"
                )));
            }
        }
    }
    Ok(())
}

fn read_f32(
    tensors: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, ArtifactError> {
    let (found, values) = finite_f32(tensors, name)?;
    if found != shape {
        return Err(mismatch(
            name,
            format!("shape {found:?}, expected {shape:?}"),
        ));
    }
    Ok(values)
}

/// The shape and values of F32 tensor `name`, refused when any value is not finite.
pub fn finite_f32(
    tensors: &SafeTensors<'_>,
    name: &str,
) -> Result<(Vec<usize>, Vec<f32>), ArtifactError> {
    let t = tensors
        .tensor(name)
        .map_err(|_| mismatch(name, "missing"))?;
    if t.dtype() != Dtype::F32 {
        return Err(mismatch(
            name,
            format!("dtype {:?}, expected F32", t.dtype()),
        ));
    }
    let values = f32s(t.data());
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(ArtifactError::NonFinite {
            tensor: name.to_string(),
            index,
        });
    }
    Ok((t.shape().to_vec(), values))
}

/// f32 values as little-endian bytes: safetensors' F32 layout.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// Little-endian bytes as f32 values; a trailing partial value is ignored.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::compute::ops::uniform;

    pub fn conv() -> Conv2dSpec {
        Conv2dSpec {
            padding: [1, 1],
            ..Conv2dSpec::new(4, 8, [3, 3])
        }
    }

    /// A valid artifact for [`conv`] and its digest.
    pub fn artifact(seed: u64) -> (Vec<u8>, String) {
        let bytes = pack(
            &conv(),
            &uniform(8 * 4 * 9, seed, 0.5),
            Some(&uniform(8, seed + 1, 0.5)),
            None,
        )
        .unwrap();
        let digest = sha256_hex(&bytes);
        (bytes, digest)
    }

    #[test]
    fn packed_artifacts_round_trip() {
        let w = uniform(8 * 4 * 9, 1, 0.5);
        let bytes = pack(&conv(), &w, Some(&[0.5; 8]), Some(&"a".repeat(64))).unwrap();
        let k = verify(&bytes, &sha256_hex(&bytes), &conv(), &Limits::default()).unwrap();
        assert_eq!(*k.weight, w);
        assert_eq!(k.bias.as_deref(), Some(&vec![0.5; 8]));
        assert_eq!(k.equivalent_to, Some("a".repeat(64)));
    }

    /// An agent let take the largest weights the API admits takes their artifact whole: its
    /// byte bound grows with its parameter bound.
    #[test]
    fn limits_for_the_largest_weights_admit_their_artifact() {
        let c = Conv2dSpec::new(4096, 4096, [1, 1]);
        let w = vec![0.25; 4096 * 4096];
        let bytes = pack(&c, &w, Some(&[0.5; 4096]), None).unwrap();
        let digest = sha256_hex(&bytes);
        let most = kernelflow_crds::validate::MAX_TENSOR_VALUES as usize + 65536;
        assert!(verify(&bytes, &digest, &c, &Limits::with_parameters(most)).is_ok());
        let fewer = Limits::with_parameters(4096 * 4096 + 4095);
        assert_eq!(refused(&bytes, &c, &fewer), "TooManyParameters");
    }

    fn refused(bytes: &[u8], c: &Conv2dSpec, limits: &Limits) -> String {
        verify(bytes, &sha256_hex(bytes), c, limits)
            .unwrap_err()
            .reason()
            .to_string()
    }

    #[test]
    fn every_defect_is_a_typed_refusal() {
        let (good, digest) = artifact(1);
        let limits = Limits::default();
        assert_eq!(
            verify(&good, &"0".repeat(64), &conv(), &limits)
                .unwrap_err()
                .reason(),
            "DigestMismatch"
        );
        assert!(verify(&good, &digest, &conv(), &limits).is_ok());
        assert_eq!(
            refused(&good[..good.len() - 4], &conv(), &limits),
            "Malformed"
        );
        assert_eq!(refused(&[1, 2, 3], &conv(), &limits), "Malformed");
        let mut huge = good.clone();
        huge[..8].copy_from_slice(&(5u64 << 30).to_le_bytes());
        assert_eq!(refused(&huge, &conv(), &limits), "HeaderTooLarge");
        assert_eq!(
            refused(
                &good,
                &Conv2dSpec {
                    out_channels: 16,
                    ..conv()
                },
                &limits
            ),
            "OpMismatch"
        );
        assert_eq!(
            refused(
                &good,
                &Conv2dSpec {
                    bias: false,
                    ..conv()
                },
                &limits
            ),
            "TensorMismatch"
        );
        assert_eq!(
            refused(
                &good,
                &conv(),
                &Limits {
                    max_parameters: 100,
                    ..limits
                }
            ),
            "TooManyParameters"
        );
        assert_eq!(
            refused(
                &good,
                &conv(),
                &Limits {
                    max_bytes: 100,
                    ..limits
                }
            ),
            "TooLarge"
        );
        // A header declaring 2^64 weights over a small tensor: refused, not an overflow.
        let huge = Conv2dSpec {
            padding: [65536, 65536],
            ..Conv2dSpec::new(65536, 65536, [65536, 65536])
        };
        let (_, header) = SafeTensors::read_metadata(&good).unwrap();
        let mut meta = header.metadata().clone().unwrap();
        for key in ["in_channels", "out_channels"] {
            meta.insert(key.into(), "65536".into());
        }
        for key in ["kernel_size", "padding"] {
            meta.insert(key.into(), pair([65536, 65536]));
        }
        let weight = SafeTensors::deserialize(&good)
            .unwrap()
            .tensor("weight")
            .unwrap();
        let lying = safetensors::serialize([("weight", weight)], Some(meta)).unwrap();
        assert_eq!(refused(&lying, &huge, &limits), "TooManyParameters");

        let mut w = uniform(8 * 4 * 9, 1, 0.5);
        w[17] = f32::INFINITY;
        let inf = pack(&conv(), &w, Some(&[0.0; 8]), None).unwrap();
        let err = verify(&inf, &sha256_hex(&inf), &conv(), &limits).unwrap_err();
        assert_eq!(
            err,
            ArtifactError::NonFinite {
                tensor: "weight".into(),
                index: 17
            }
        );
    }

    #[test]
    fn a_wrong_weight_shape_is_refused() {
        // Metadata claims 3x3 but the tensor is 1x1.
        let one = Conv2dSpec {
            kernel_size: [1, 1],
            padding: [0, 0],
            ..conv()
        };
        let w = uniform(8 * 4, 1, 0.5);
        let mut bytes = pack(&one, &w, Some(&[0.0; 8]), None).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(bytes[8..8 + header_len].to_vec()).unwrap();
        let forged = header
            .replace("\"kernel_size\":\"1,1\"", "\"kernel_size\":\"3,3\"")
            .replace("\"padding\":\"0,0\"", "\"padding\":\"1,1\"");
        assert_ne!(forged, header);
        assert_eq!(forged.len(), header.len());
        bytes[8..8 + header_len].copy_from_slice(forged.as_bytes());
        let err = verify(&bytes, &sha256_hex(&bytes), &conv(), &Limits::default()).unwrap_err();
        assert!(
            matches!(&err, ArtifactError::TensorMismatch { tensor, .. } if tensor == "weight"),
            "{err}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Hostile bytes (a valid artifact with bytes flipped, cut, or a forged header length)
        /// are refused with an error, never a panic.
        #[test]
        fn mutated_artifacts_never_panic(
            flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 0..8),
            cut in 0usize..4096,
            header in proptest::option::of(proptest::prelude::any::<u64>()),
        ) {
            let (mut bytes, _) = artifact(9);
            for (at, value) in flips {
                let i = at % bytes.len();
                bytes[i] = value;
            }
            if let Some(h) = header {
                bytes[..8].copy_from_slice(&h.to_le_bytes());
            }
            bytes.truncate(cut.max(1) % (bytes.len() + 1));
            let _ = parse(&bytes, &sha256_hex(&bytes), &conv(), &Limits::default());
        }
    }
}
