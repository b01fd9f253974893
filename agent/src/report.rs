//! The node's `NodeReport`, written by server-side apply under the agent's field manager,
//! owned by its Node: a node that goes (scaled down, say) takes its report along, so the
//! operator stops exporting its heartbeat and alerting on its silence.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::node_report::{KernelReport, WorkerReport};
use kernelflow_crds::{NodeReport, NodeReportSpec};
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};

use crate::FIELD_MANAGER;

/// How often the report's owner, the Node, is read again.
const OWNER_REFRESH: Duration = Duration::from_secs(300);

/// Writes one node's report.
pub struct Reporter {
    api: Api<NodeReport>,
    nodes: Api<Node>,
    node: String,
    backend: String,
    /// The Node as the report's owner, and when it was read.
    owner: Mutex<Option<(OwnerReference, Instant)>>,
}

impl Reporter {
    pub fn new(client: kube::Client, node: &str, backend: &str) -> Self {
        Self {
            api: Api::all(client.clone()),
            nodes: Api::all(client),
            node: node.into(),
            backend: backend.into(),
            owner: Mutex::default(),
        }
    }

    /// The Node as an owner: read once it exists (a report without one waits for the next),
    /// and again every [`OWNER_REFRESH`], since a Node deleted and registered again under the
    /// same name has a new uid (and the old one's dependents are collected).
    async fn owner(&self) -> Option<OwnerReference> {
        let known = self.owner.lock().expect("owner lock").clone();
        if let Some((owner, read)) = &known
            && read.elapsed() < OWNER_REFRESH
        {
            return Some(owner.clone());
        }
        let read = match self.nodes.get_opt(&self.node).await {
            Ok(node) => node,
            // Unread: the owner known stands until a read says otherwise.
            Err(_) => return known.map(|(owner, _)| owner),
        };
        // No Node (gone): no owner, rather than one whose absence gets the report collected.
        let Some(owner) = read.and_then(|n| n.controller_owner_ref(&())) else {
            *self.owner.lock().expect("owner lock") = None;
            return None;
        };
        let owner = OwnerReference {
            controller: None,
            block_owner_deletion: None,
            ..owner
        };
        *self.owner.lock().expect("owner lock") = Some((owner.clone(), Instant::now()));
        Some(owner)
    }

    /// The report as of now.
    pub fn build(&self, kernels: Vec<KernelReport>, workers: Vec<WorkerReport>) -> NodeReport {
        NodeReport::new(
            &self.node,
            NodeReportSpec {
                node_name: self.node.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                backend: self.backend.clone(),
                heartbeat_time: Time(Timestamp::now()),
                kernel_count: kernels.len() as u32,
                kernels,
                workers,
            },
        )
    }

    /// Applies the report, creating it on the first call.
    pub async fn publish(
        &self,
        kernels: Vec<KernelReport>,
        workers: Vec<WorkerReport>,
    ) -> Result<(), kube::Error> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut report = self.build(kernels, workers);
        report.metadata.owner_references = self.owner().await.map(|o| vec![o]);
        self.api
            .patch(&self.node, &pp, &Patch::Apply(&report))
            .await?;
        Ok(())
    }
}
