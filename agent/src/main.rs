use clap::Parser;

fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let args = kernelflow_agent::Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(kernelflow_agent::run(args));
    // Shutting the runtime down drops its tasks, and with them the compute backends, whose
    // teardowns must end before the process does. A training step still running on a
    // blocking thread is not waited for past the pod's grace: its last checkpoint stands.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    kernelflow_agent::compute::cuda::settle();
    result
}
