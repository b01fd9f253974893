//! The node's `NodeReport`, written by server-side apply under the agent's field manager.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::node_report::{KernelReport, WorkerReport};
use kernelflow_crds::{NodeReport, NodeReportSpec};
use kube::api::{Api, Patch, PatchParams};

use crate::FIELD_MANAGER;

/// Writes one node's report.
pub struct Reporter {
    api: Api<NodeReport>,
    node: String,
    backend: String,
}

impl Reporter {
    pub fn new(client: kube::Client, node: &str, backend: &str) -> Self {
        Self {
            api: Api::all(client),
            node: node.into(),
            backend: backend.into(),
        }
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
        let report = self.build(kernels, workers);
        self.api
            .patch(&self.node, &pp, &Patch::Apply(&report))
            .await?;
        Ok(())
    }
}
