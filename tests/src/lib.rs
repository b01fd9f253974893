//! Test and demo support: a real local control plane, the kernelflow processes on it,
//! per-test namespaces, and a real Prometheus evaluating the alerts.

pub mod cluster;
pub mod env;
pub mod prometheus;
