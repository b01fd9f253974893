//! Packs conv2d weights into a kernel artifact and prints its digest and the KernelDeployment
//! stanza that names it.
//!
//! kernelflow-pack --in-channels 64 --out-channels 64 --kernel-size 3,3 --padding 1,1 \
//!     --weights w.f32 [--bias b.f32] --out conv.safetensors
//!
//! Weights are raw little-endian f32, `[out, in/groups, kh, kw]` row-major; `--seed` makes
//! deterministic random ones instead (for demos and tests).

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use kernelflow_agent::artifact::format::{Limits, f32s, pack, sha256_hex, verify};
use kernelflow_agent::compute::ops::uniform;
use kernelflow_crds::{Conv2dSpec, DType, validate};

#[derive(Parser, Debug)]
#[command(
    name = "kernelflow-pack",
    version,
    about = "Pack conv2d weights into a kernelflow kernel artifact"
)]
struct Args {
    #[arg(long)]
    in_channels: u32,
    #[arg(long)]
    out_channels: u32,
    /// Kernel height and width, as `H,W`.
    #[arg(long, value_parser = pair)]
    kernel_size: [u32; 2],
    #[arg(long, value_parser = pair, default_value = "1,1")]
    stride: [u32; 2],
    #[arg(long, value_parser = pair, default_value = "0,0")]
    padding: [u32; 2],
    #[arg(long, value_parser = pair, default_value = "1,1")]
    dilation: [u32; 2],
    #[arg(long, default_value_t = 1)]
    groups: u32,
    /// Pack no bias tensor.
    #[arg(long)]
    no_bias: bool,
    /// Raw little-endian f32 weights.
    #[arg(long, conflicts_with = "seed", required_unless_present = "seed")]
    weights: Option<PathBuf>,
    /// Raw little-endian f32 bias.
    #[arg(long, conflicts_with = "seed")]
    bias: Option<PathBuf>,
    /// Deterministic random weights and bias from this seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Multiply the weights by this factor (for example to make a revision that overflows).
    #[arg(long, default_value_t = 1.0)]
    weight_scale: f64,
    /// Declare the artifact to compute the same function as the artifact with this sha256.
    #[arg(long)]
    equivalent_to: Option<String>,
    /// Where to write the artifact.
    #[arg(long)]
    out: PathBuf,
}

fn pair(s: &str) -> Result<[u32; 2], String> {
    let parts: Vec<&str> = s.split(',').collect();
    match parts.as_slice() {
        [a, b] => Ok([
            a.trim().parse().map_err(|e| format!("{e}"))?,
            b.trim().parse().map_err(|e| format!("{e}"))?,
        ]),
        [a] => a.trim().parse().map(|v| [v, v]).map_err(|e| format!("{e}")),
        _ => Err(format!("expected H,W, got {s:?}")),
    }
}

fn read_f32(path: &PathBuf, expected: usize, what: &str) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() != 4 * expected {
        bail!(
            "{} holds {} bytes; the {what} needs {expected} f32 values ({} bytes)",
            path.display(),
            bytes.len(),
            4 * expected
        );
    }
    Ok(f32s(&bytes))
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let bytes = build(&a)?;
    let digest = sha256_hex(&bytes);
    std::fs::write(&a.out, &bytes).with_context(|| format!("writing {}", a.out.display()))?;
    let path = std::fs::canonicalize(&a.out)?;
    println!(
        "wrote {} ({} bytes)\nsha256: {digest}\n\nartifact:\n  url: file://{}\n  sha256: {digest}",
        a.out.display(),
        bytes.len(),
        path.display()
    );
    Ok(())
}

/// The artifact's bytes, for a conv2d that the API accepts and weights that validate.
fn build(a: &Args) -> anyhow::Result<Vec<u8>> {
    let conv = Conv2dSpec {
        in_channels: a.in_channels,
        out_channels: a.out_channels,
        kernel_size: a.kernel_size,
        stride: a.stride,
        padding: a.padding,
        dilation: a.dilation,
        groups: a.groups,
        bias: !a.no_bias,
        dtype: DType::F32,
    };
    // The API's own rules: an artifact of a conv2d that no KernelDeployment may declare is
    // of no use. They also bound the weights, so the lengths below cannot overflow.
    validate::conv2d_alone("conv2d", &conv).map_err(|e| anyhow!(validate::describe(&e)))?;
    if let Some(d) = a
        .equivalent_to
        .as_deref()
        .filter(|d| !validate::is_sha256(d))
    {
        bail!("--equivalent-to {d:?} must be a sha256 digest: 64 lowercase hex digits");
    }
    let [kh, kw] = conv.kernel_size.map(|k| k as usize);
    let per_output = (a.in_channels / a.groups) as usize * kh * kw;
    let weight_len = a.out_channels as usize * per_output;
    let (mut weight, bias) = match (a.seed, &a.weights) {
        (Some(seed), _) => {
            let scale = 1.0 / (per_output as f32).sqrt();
            (
                uniform(weight_len, seed, scale),
                conv.bias
                    .then(|| uniform(a.out_channels as usize, seed.wrapping_add(1), scale)),
            )
        }
        (None, Some(path)) => {
            let bias = match (&a.bias, conv.bias) {
                (Some(b), true) => Some(read_f32(b, a.out_channels as usize, "bias")?),
                (None, true) => Some(vec![0.0; a.out_channels as usize]),
                (Some(_), false) => bail!("--bias given with --no-bias"),
                (None, false) => None,
            };
            (read_f32(path, weight_len, "weight")?, bias)
        }
        (None, None) => bail!("give --weights or --seed"),
    };
    // In f64, so that a factor beyond f32's range can still give finite weights.
    weight
        .iter_mut()
        .for_each(|w| *w = (f64::from(*w) * a.weight_scale) as f32);
    let bytes = pack(&conv, &weight, bias.as_deref(), a.equivalent_to.as_deref())?;
    verify(
        &bytes,
        &sha256_hex(&bytes),
        &conv,
        &Limits {
            max_parameters: usize::MAX,
            max_bytes: usize::MAX,
            ..Limits::default()
        },
    )
    .context("the packed artifact does not validate")?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_from(args: &str) -> anyhow::Result<Vec<u8>> {
        let argv = ["kernelflow-pack", "--out", "unused"]
            .into_iter()
            .chain(args.split_whitespace());
        build(&Args::try_parse_from(argv)?)
    }

    #[test]
    fn conv2ds_the_api_refuses_are_not_packed() {
        let base = "--in-channels 4 --out-channels 8 --kernel-size 3 --seed 1";
        assert!(build_from(base).is_ok());
        for (args, says) in [
            (
                "--in-channels 1 --out-channels 0 --kernel-size 1 --seed 1",
                "outChannels",
            ),
            (
                "--in-channels 0 --out-channels 1 --kernel-size 1 --seed 1",
                "inChannels",
            ),
            (
                "--in-channels 65536 --out-channels 65536 --kernel-size 3 --seed 1",
                "weights",
            ),
            (&format!("{base} --stride 0,0"), "stride"),
            (&format!("{base} --groups 3"), "groups"),
            (&format!("{base} --equivalent-to ABC"), "sha256"),
        ] {
            let e = build_from(args).expect_err(args).to_string();
            assert!(e.contains(says), "{args}: {e}");
        }
        let last = "--in-channels 1 --out-channels 1 --kernel-size 1 --seed 18446744073709551615";
        assert!(build_from(last).is_ok());
    }
}
