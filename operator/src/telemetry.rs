//! Logging: `RUST_LOG`-filtered, human-readable lines on stderr.

/// Installs the global subscriber; `RUST_LOG` overrides the default `info`.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
