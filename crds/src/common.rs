//! Types shared by both resources: the conv2d op and artifact references.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A kernel or data artifact, pinned by content digest.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactRef {
    /// Where the artifact is fetched from: `file://`, `http://`, `https://` or `s3://`.
    #[schemars(regex(pattern = r"^(file|https?|s3)://.+"), length(max = 2048))]
    pub url: String,
    /// SHA-256 of the artifact's bytes, 64 lowercase hex digits. The agent refuses
    /// any artifact whose bytes do not hash to this value.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
}

/// Element type of a conv2d. Agents run `f32` alone so far: `f16` and `bf16` are names kept
/// for a later GPU path, which validation refuses until an agent can run them.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    F32,
    F16,
    Bf16,
}

/// A 2-D convolution over NCHW tensors.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Conv2dSpec {
    /// Input channels (C).
    #[schemars(range(min = 1, max = 65536))]
    pub in_channels: u32,
    /// Output channels (K).
    #[schemars(range(min = 1, max = 65536))]
    pub out_channels: u32,
    /// Kernel height and width (R, S).
    #[schemars(inner(range(min = 1, max = 65536)))]
    pub kernel_size: [u32; 2],
    /// Stride along height and width.
    #[serde(default = "ones")]
    #[schemars(default = "ones", inner(range(min = 1, max = 65536)))]
    pub stride: [u32; 2],
    /// Zero padding added to each side along height and width.
    #[serde(default)]
    #[schemars(inner(range(max = 65536)))]
    pub padding: [u32; 2],
    /// Spacing between kernel taps along height and width.
    #[serde(default = "ones")]
    #[schemars(default = "ones", inner(range(min = 1, max = 65536)))]
    pub dilation: [u32; 2],
    /// Channel groups; both channel counts must be divisible by it.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 65536), default = "one")]
    pub groups: u32,
    /// Whether the op adds a per-output-channel bias.
    #[serde(default = "yes")]
    #[schemars(default = "yes")]
    pub bias: bool,
    /// Element type.
    #[serde(default)]
    pub dtype: DType,
}

fn ones() -> [u32; 2] {
    [1, 1]
}
fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

impl Conv2dSpec {
    /// A conv2d with the API's defaults: stride 1, no padding, no dilation, one group,
    /// with bias, f32.
    pub fn new(in_channels: u32, out_channels: u32, kernel_size: [u32; 2]) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel_size,
            stride: ones(),
            padding: [0, 0],
            dilation: ones(),
            groups: one(),
            bias: yes(),
            dtype: DType::F32,
        }
    }

    /// Output height and width for an input of `input` (height, width), or `None`
    /// when the kernel, dilated, does not fit the padded input.
    pub fn output_size(&self, input: [u32; 2]) -> Option<[u32; 2]> {
        let dim = |i: usize| -> Option<u32> {
            let padded = u64::from(input[i]) + 2 * u64::from(self.padding[i]);
            let reach =
                u64::from(self.dilation[i]) * (u64::from(self.kernel_size[i]).checked_sub(1)?) + 1;
            let stride = u64::from(self.stride[i]);
            if stride == 0 || padded < reach {
                return None;
            }
            u32::try_from((padded - reach) / stride + 1).ok()
        };
        Some([dim(0)?, dim(1)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn conv(k: u32, stride: u32, pad: u32, dil: u32) -> Conv2dSpec {
        Conv2dSpec {
            stride: [stride, stride],
            padding: [pad, pad],
            dilation: [dil, dil],
            ..Conv2dSpec::new(4, 8, [k, k])
        }
    }

    #[test]
    fn output_size_matches_the_usual_formula() {
        assert_eq!(conv(3, 1, 1, 1).output_size([56, 56]), Some([56, 56]));
        assert_eq!(conv(7, 2, 3, 1).output_size([224, 224]), Some([112, 112]));
        assert_eq!(conv(1, 1, 0, 1).output_size([14, 14]), Some([14, 14]));
        assert_eq!(conv(3, 1, 0, 2).output_size([10, 10]), Some([6, 6]));
    }

    #[test]
    fn output_size_is_none_when_the_kernel_does_not_fit() {
        assert_eq!(conv(5, 1, 0, 1).output_size([4, 4]), None);
        assert_eq!(conv(3, 1, 0, 3).output_size([6, 6]), None);
        assert_eq!(conv(0, 1, 0, 1).output_size([6, 6]), None);
        assert_eq!(conv(3, 0, 0, 1).output_size([6, 6]), None);
    }
}
