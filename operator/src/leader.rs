//! Leader election on a `coordination.k8s.io` Lease. Every replica serves the webhook and
//! its metrics; only the Lease holder runs controllers, and a standby takes over once a
//! leader has failed to renew for the Lease's duration.

use std::time::Duration;

use anyhow::bail;
use kube_lease_manager::LeaseManagerBuilder;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Identifies the Lease and its timing.
pub struct LeaseConfig<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub identity: &'a str,
    pub duration_seconds: u64,
}

/// Runs `work` whenever this replica holds the Lease, stops it when the Lease is lost, and
/// releases the Lease on `shutdown` so that a standby takes over at once.
pub async fn lead<W, F>(
    client: &kube::Client,
    lease: LeaseConfig<'_>,
    metrics: &Metrics,
    mut work: W,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()>
where
    W: FnMut() -> F,
    F: Future<Output = ()>,
{
    // Renew a third of the way before expiry, as client-go's defaults do (15s lease, 10s deadline).
    let grace = (lease.duration_seconds / 3).max(1);
    let manager = LeaseManagerBuilder::new(client.clone(), lease.name)
        .with_namespace(lease.namespace)
        .with_identity(lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(grace)
        .build()
        .await?;
    let (mut leading, task) = manager.watch().await;
    let campaign = async {
        loop {
            while !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    bail!("the lease manager stopped");
                }
            }
            info!(
                lease = lease.name,
                "acquired the lease; starting controllers"
            );
            metrics.leader.set(1);
            let lost = async {
                loop {
                    if leading.changed().await.is_err() || !*leading.borrow() {
                        return;
                    }
                }
            };
            tokio::select! {
                () = work() => bail!("the controllers stopped"),
                () = lost => {}
            }
            metrics.leader.set(0);
            warn!(lease = lease.name, "lost the lease; controllers stopped");
        }
    };
    let result = tokio::select! {
        r = campaign => r,
        () = shutdown => Ok(()),
    };
    metrics.leader.set(0);
    // Closing the channel makes the manager release the Lease.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), task).await {
        Ok(Ok(Ok(_))) => info!(lease = lease.name, "released the lease"),
        Ok(Ok(Err(e))) => warn!(error = %e, "releasing the lease failed"),
        Ok(Err(e)) => warn!(error = %e, "the lease task failed"),
        Err(_) => warn!("releasing the lease timed out"),
    }
    result
}
