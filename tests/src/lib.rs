//! Test and demo support: a real local control plane, the kernelflow processes on it, and
//! per-test namespaces.

pub mod cluster;
pub mod env;
