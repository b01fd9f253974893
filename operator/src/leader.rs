//! Leader election on a `coordination.k8s.io` Lease. Every replica serves the webhook and
//! its metrics; only the Lease holder runs controllers, and a standby takes over once a
//! leader has failed to renew for the Lease's duration.

use std::time::Duration;

use anyhow::bail;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
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
    let api: Api<Lease> = Api::namespaced(client.clone(), lease.namespace);
    let hold = Hold {
        api: &api,
        name: lease.name,
        identity: lease.identity,
        grace,
    };
    let campaign = async {
        loop {
            while !*leading.borrow_and_update() {
                if leading.changed().await.is_err() {
                    bail!("the lease manager stopped");
                }
            }
            // The manager's flag stays up while its renewals fail: start only on a hold the
            // Lease as stored shows.
            let Some(until) = hold.confirmed().await else {
                tokio::time::sleep(hold.poll()).await;
                continue;
            };
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
                () = lost => warn!(lease = lease.name, "lost the lease; controllers stopped"),
                () = hold.lapses(until) => warn!(
                    lease = lease.name,
                    "the lease was not seen renewed before its deadline; controllers stopped"
                ),
            }
            metrics.leader.set(0);
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

/// This replica's hold on the Lease, as the API server stores it.
struct Hold<'a> {
    api: &'a Api<Lease>,
    name: &'a str,
    identity: &'a str,
    grace: u64,
}

impl Hold<'_> {
    /// How often the Lease is read while leading: twice per grace period.
    fn poll(&self) -> Duration {
        Duration::from_millis(self.grace * 500)
    }

    /// Until when this replica may act, if the stored Lease shows it holding.
    /// A read that hangs counts as none after a grace period, so that the campaign goes on.
    async fn confirmed(&self) -> Option<Timestamp> {
        let read = self.api.get(self.name);
        match tokio::time::timeout(Duration::from_secs(self.grace), read).await {
            Ok(Ok(stored)) => acts_until(&stored, self.identity, self.grace)
                .filter(|until| *until > Timestamp::now()),
            Ok(Err(e)) => {
                warn!(error = %e, "reading the lease failed");
                None
            }
            Err(_) => {
                warn!("reading the lease timed out");
                None
            }
        }
    }

    /// Returns once the hold is not seen renewed before its deadline (`until` at first): the
    /// lease manager keeps its flag up while renewals fail (the API server unreachable, say),
    /// while a standby takes over once the Lease expires. client-go's leaders stop at their
    /// renew deadline likewise.
    ///
    /// Reads come closer together as the deadline nears, since a renewal lands a half grace
    /// before it. A read in flight at the deadline gets a quarter grace more, well before a
    /// standby may take over, and no longer: the client sets no read timeout, and a dead
    /// connection would otherwise keep this replica acting for as long as TCP takes to notice.
    async fn lapses(&self, mut until: Timestamp) {
        let slack = Duration::from_millis(self.grace * 250);
        let left = |until: Timestamp| {
            Duration::try_from(until.duration_since(Timestamp::now())).unwrap_or_default()
        };
        while !left(until).is_zero() {
            let wait = self.poll().min(left(until) / 2);
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
            let read = self.api.get(self.name);
            match tokio::time::timeout(left(until) + slack, read).await {
                Err(_) => return,
                Ok(Ok(stored)) => match acts_until(&stored, self.identity, self.grace) {
                    Some(t) => until = t,
                    None => return,
                },
                Ok(Err(e)) => warn!(error = %e, "reading the lease failed"),
            }
        }
    }
}

/// Until when the holder of `lease` may act if it is `identity`: its last renewal plus the
/// Lease's duration less half the grace, after the renewal due a grace before expiry and
/// before a standby may take over. `None` if another replica holds it, or nobody.
fn acts_until(lease: &Lease, identity: &str, grace: u64) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    if spec.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let duration = i64::from(spec.lease_duration_seconds?);
    let grace = i64::try_from(grace).ok()?;
    renewed
        .checked_add(SignedDuration::from_millis(duration * 1000 - grace * 500))
        .ok()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    use super::*;

    fn lease(holder: Option<&str>, renewed: Option<i64>, acquired: Option<i64>) -> Lease {
        let at = |s: i64| MicroTime(Timestamp::from_second(s).unwrap());
        Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(String::from),
                lease_duration_seconds: Some(15),
                renew_time: renewed.map(at),
                acquire_time: acquired.map(at),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_holder_acts_until_half_a_grace_before_its_lease_expires() {
        let t = |s: i64, ms: i64| {
            Timestamp::from_second(s)
                .unwrap()
                .checked_add(SignedDuration::from_millis(ms))
                .unwrap()
        };
        let held = lease(Some("a"), Some(1_000), Some(900));
        assert_eq!(acts_until(&held, "a", 5), Some(t(1_012, 500)));
        assert_eq!(acts_until(&held, "b", 5), None, "another's");
        let acquired = lease(Some("a"), None, Some(900));
        assert_eq!(acts_until(&acquired, "a", 5), Some(t(912, 500)));
        assert_eq!(acts_until(&lease(None, Some(1_000), None), "a", 5), None);
    }

    #[tokio::test]
    async fn a_leader_stops_at_its_deadline_while_reading_the_lease_hangs() {
        // An API server that takes connections and never answers, as over a dead one.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        // As `run` does: in a workspace build rustls has two providers to choose from.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
        let api = Api::<Lease>::namespaced(client, "default");
        let hold = Hold {
            api: &api,
            name: "lease",
            identity: "a",
            grace: 1,
        };
        let until = Timestamp::now() + SignedDuration::from_secs(1);
        tokio::time::timeout(Duration::from_secs(30), hold.lapses(until))
            .await
            .expect("stopped at the deadline, not when the read gave up");
        assert!(Timestamp::now() >= until);
    }
}
