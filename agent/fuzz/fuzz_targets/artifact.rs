//! Feeds arbitrary bytes to the artifact parser and validator: they must be refused with an
//! error or accepted, never crash, hang or allocate what a header claims.
#![no_main]

use kernelflow_agent::artifact::format::{Limits, parse, sha256_hex, verify};
use kernelflow_crds::Conv2dSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let conv = Conv2dSpec {
        padding: [1, 1],
        bias: data.first().is_some_and(|b| b & 1 == 1),
        ..Conv2dSpec::new(4, 8, [3, 3])
    };
    let limits = Limits::default();
    let _ = parse(data, &sha256_hex(data), &conv, &limits);
    let _ = verify(data, &"0".repeat(64), &conv, &limits);
});
