"""The conv2d shapes every benchmark measures, as in agent/benches/shapes/mod.rs (the Rust benchmarks)."""

SHAPES = [  # N, C, H (= W), K, R (= S), stride, pad
    (8, 64, 56, 64, 3, 1, 1),
    (8, 128, 28, 128, 3, 1, 1),
    (8, 256, 14, 256, 1, 1, 0),
    (8, 3, 224, 64, 7, 2, 3),
    (1, 32, 32, 32, 3, 1, 1),
]
