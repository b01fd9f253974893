//! Kernel artifacts and the node cache: fetch, verify, validate, keep warm.

pub mod disk;
pub mod format;
pub mod memory;
pub mod metrics;
pub mod remote;
pub mod store;

#[cfg(test)]
mod tests;
