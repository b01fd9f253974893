//! Reconcile errors. Each variant has a stable label for metrics and events.

/// What can go wrong in a reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("serialising status: {0}")]
    Serialize(#[from] serde_json::Error),
    /// Not a failure: a deleted KernelDeployment waits for its nodes to drain.
    #[error("waiting for {0} nodes to drain their traffic")]
    Draining(usize),
}

impl Error {
    /// A short, stable label for metrics and events.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Finalizer(_) => "finalizer",
            Error::Serialize(_) => "serialize",
            Error::Draining(_) => "draining",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
