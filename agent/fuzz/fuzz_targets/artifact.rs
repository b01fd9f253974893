//! Feeds arbitrary bytes to the artifact parser and validator: they must be refused with an
//! error or accepted, never crash, hang or allocate what a header claims.
#![no_main]

use kernelflow_agent::artifact::format::{Limits, parse, sha256_hex, verify};
use kernelflow_crds::{Conv2dSpec, DType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let conv = Conv2dSpec {
        in_channels: 4,
        out_channels: 8,
        kernel_size: [3, 3],
        stride: [1, 1],
        padding: [1, 1],
        dilation: [1, 1],
        groups: 1,
        bias: data.first().is_some_and(|b| b & 1 == 1),
        dtype: DType::F32,
    };
    let limits = Limits::default();
    let _ = parse(data, &sha256_hex(data), &conv, &limits);
    let _ = verify(data, &"0".repeat(64), &conv, &limits);
});
