use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kernelflow_operator::telemetry::init();
    kernelflow_operator::run(kernelflow_operator::Args::parse()).await
}
