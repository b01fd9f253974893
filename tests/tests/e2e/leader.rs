//! With two replicas exactly one reconciles; when the leader dies the other takes over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kernelflow_crds::KernelDeployment;
use kube::api::{Api, PostParams};

use crate::{eventually, kernel_deployment, setup};

const LEASE_SECONDS: u64 = 4;

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt("kf").await.ok()??.spec?.holder_identity
}

#[tokio::test]
async fn a_standby_takes_over_when_the_leader_dies() {
    let (env, client, ns) = setup("leader").await;
    let duration = LEASE_SECONDS.to_string();
    let replica = |id: &str| {
        env.spawn(
            "kernelflow-operator",
            &format!("leader-{id}"),
            &[
                "--namespace",
                &ns,
                "--watch-namespace",
                &ns,
                "--lease-name",
                "kf",
                "--lease-duration-seconds",
                &duration,
                "--identity",
                id,
            ],
        )
        .expect("starting a replica")
    };
    let mut replicas = vec![replica("a"), replica("b")];
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let first = eventually(Duration::from_secs(30), "a lease holder", || {
        holder(&leases)
    })
    .await;

    // Exactly one replica says it leads (gauges follow the Lease within moments).
    let leading = eventually(
        Duration::from_secs(30),
        "exactly one leader gauge at 1",
        || async {
            let mut gauges = Vec::new();
            for r in &replicas {
                gauges.push(r.metric("kernelflow_operator_leader").await?);
            }
            (gauges.iter().sum::<f64>() == 1.0).then_some(gauges)
        },
    )
    .await;
    let (leader, standby) = if first == "a" { (0, 1) } else { (1, 0) };
    assert_eq!(leading[leader], 1.0);

    let kds: Api<KernelDeployment> = Api::namespaced(client.clone(), &ns);
    let reconciled = |name: &'static str| {
        let kds = kds.clone();
        async move { (kds.get(name).await.ok()?.status?.observed_generation == Some(1)).then_some(()) }
    };
    let kd: KernelDeployment = serde_json::from_value(kernel_deployment("before")).unwrap();
    kds.create(&PostParams::default(), &kd).await.unwrap();
    eventually(Duration::from_secs(30), "the leader to reconcile", || {
        reconciled("before")
    })
    .await;

    // SIGKILL: no chance to release the lease.
    replicas[leader].kill();
    let killed = Instant::now();
    let second = eventually(
        Duration::from_secs(6 * LEASE_SECONDS),
        "the standby to take the lease",
        || async { holder(&leases).await.filter(|h| *h != first) },
    )
    .await;
    let took = killed.elapsed();
    println!("takeover after {took:?} (lease duration {LEASE_SECONDS}s)");
    assert_eq!(second, ["a", "b"][standby]);
    // Expiry is measured from the leader's last renewal, so a takeover needs at most one lease
    // duration after the kill, plus the standby's retry period and the API server's latency
    // on a machine that other tests share.
    assert!(
        took < Duration::from_secs(3 * LEASE_SECONDS),
        "takeover took {took:?}"
    );

    let kd: KernelDeployment = serde_json::from_value(kernel_deployment("after")).unwrap();
    kds.create(&PostParams::default(), &kd).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "the new leader to reconcile",
        || reconciled("after"),
    )
    .await;
    assert_eq!(
        replicas[standby].metric("kernelflow_operator_leader").await,
        Some(1.0),
        "{}",
        replicas[standby].log_tail()
    );
}

/// On SIGTERM the operator reports not ready at once, its webhook serves on while a
/// Service's endpoints would drop the pod, and it exits after the delay.
#[tokio::test]
async fn on_sigterm_the_webhook_serves_on_not_ready_then_the_operator_exits() {
    let (env, _client, ns) = setup("shutdown").await;
    let dir = env.logs.join(format!("{ns}-webhook-cert"));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    let webhook = std::net::SocketAddr::from((
        [127, 0, 0, 1],
        kernelflow_e2e::cluster::free_port().unwrap(),
    ));
    let mut operator = env
        .spawn_operator(
            "shutdown",
            &[
                "--webhook-only",
                "--webhook-cert-dir",
                dir.to_str().unwrap(),
                "--webhook-addr",
                &webhook.to_string(),
                "--shutdown-delay-seconds",
                "10",
            ],
        )
        .expect("starting the operator");
    operator.wait_ready(Duration::from_secs(30)).await.unwrap();
    let pid = operator.child.id().to_string();
    // The shell's own `kill`: no procps needed.
    let signalled = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status();
    assert!(signalled.unwrap().success());
    let terminated = Instant::now();
    eventually(
        Duration::from_secs(5),
        "/readyz to say not ready",
        || async { (operator.get("/readyz").await?.0 == 503).then_some(()) },
    )
    .await;
    assert!(
        tokio::net::TcpStream::connect(webhook).await.is_ok(),
        "the webhook serves on"
    );
    loop {
        if let Some(status) = operator.child.try_wait().unwrap() {
            assert!(status.success(), "{status}: {}", operator.log_tail());
            break;
        }
        assert!(
            terminated.elapsed() < Duration::from_secs(60),
            "{}",
            operator.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        terminated.elapsed() >= Duration::from_secs(10),
        "left before its delay"
    );
}
