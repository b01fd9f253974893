//! `kubectl kernelflow`: control and watch KernelDeployment rollouts. On the PATH as
//! `kubectl-kernelflow`, kubectl runs it as a plugin.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Parser, Subcommand};
use kernelflow_crds::kernel_deployment::ManualAction;
use kernelflow_crds::{KernelDeployment, NodeReport};
use kernelflow_operator::plugin;
use kube::api::{Api, Patch, PatchParams};

#[derive(Parser)]
#[command(
    name = "kubectl-kernelflow",
    version,
    about = "Control and watch kernelflow rollouts"
)]
struct Cli {
    /// Namespace of the KernelDeployment (default: the kubeconfig's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Skip the rest of the current step (pause and analysis), or leave Degraded.
    Promote {
        name: String,
        /// Go straight to 100%.
        #[arg(long)]
        full: bool,
    },
    /// Send all traffic back to the stable revision.
    Abort { name: String },
    /// Start a rolled-back, degraded or failed rollout again from its first step.
    Retry { name: String },
    /// Hold the rollout at its current step (`spec.paused: true`).
    Pause { name: String },
    /// Let a paused rollout continue.
    Resume { name: String },
    /// Show the rollout as a tree.
    Get {
        name: String,
        /// Redraw every second until interrupted.
        #[arg(short, long)]
        watch: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let ns = cli
        .namespace
        .unwrap_or_else(|| client.default_namespace().to_string());
    let kds: Api<KernelDeployment> = Api::namespaced(client.clone(), &ns);
    let (name, action) = match cli.command {
        Command::Get { name, watch } => return get(&kds, &Api::all(client), &name, watch).await,
        Command::Pause { name } => {
            let patch = plugin::pause_patch(true);
            return patch_kd(&kds, &ns, &name, &patch).await;
        }
        Command::Resume { name } => {
            let patch = plugin::pause_patch(false);
            return patch_kd(&kds, &ns, &name, &patch).await;
        }
        Command::Promote { name, full: true } => (name, ManualAction::PromoteFull),
        Command::Promote { name, full: false } => (name, ManualAction::Promote),
        Command::Abort { name } => (name, ManualAction::Abort),
        Command::Retry { name } => (name, ManualAction::Retry),
    };
    let id = plugin::action_id();
    // Read, check that no action is pending, write on that version; again on a conflict.
    for _ in 0..5 {
        let kd = kds
            .get(&name)
            .await
            .with_context(|| format!("getting kerneldeployment {ns}/{name}"))?;
        let patch = plugin::action_patch_for(&kd, action, &id)
            .map_err(|e| anyhow!("kerneldeployment {ns}/{name}: {e}"))?;
        match patch_kd(&kds, &ns, &name, &patch).await {
            Err(e)
                if e.downcast_ref::<kube::Error>()
                    .is_some_and(|e| matches!(e, kube::Error::Api(s) if s.code == 409)) => {}
            done => return done,
        }
    }
    bail!("kerneldeployment {ns}/{name} kept changing; try again")
}

async fn patch_kd(
    kds: &Api<KernelDeployment>,
    ns: &str,
    name: &str,
    patch: &serde_json::Value,
) -> anyhow::Result<()> {
    kds.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .with_context(|| format!("patching kerneldeployment {ns}/{name}"))?;
    println!("kerneldeployment {ns}/{name} patched");
    Ok(())
}

async fn get(
    kds: &Api<KernelDeployment>,
    reports: &Api<NodeReport>,
    name: &str,
    watch: bool,
) -> anyhow::Result<()> {
    loop {
        let kd = kds
            .get(name)
            .await
            .with_context(|| format!("getting {name}"))?;
        let reports = reports.list(&Default::default()).await?.items;
        if watch {
            // Clear the screen and home the cursor, then draw.
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", plugin::render(&kd, &reports));
        if !watch {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
