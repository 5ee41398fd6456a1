//! Where the agent learns about Services and EndpointSlices.
//!
//! Every source implements [`Source`]: it runs until the agent stops, sending [`Update`]s.
//! The first one must be a complete [`Update::Snapshot`], because the first sync removes every
//! frontend it does not claim; after that, incremental updates or snapshots, whichever the
//! source has. The store diffs whatever it gets, so a relist never resets anything.

use std::{future::Future, path::PathBuf, pin::Pin, time::Instant};

use tokio::sync::mpsc;

use crate::k8s::store::Update;

/// An update and when the source received it, to measure event-to-datapath latency.
#[derive(Debug)]
pub struct Stamped {
    /// The update.
    pub update: Update,
    /// When the source got it.
    pub at: Instant,
}

impl Stamped {
    /// An update received now.
    pub fn now(update: Update) -> Self {
        Self {
            update,
            at: Instant::now(),
        }
    }
}

pub mod file;
pub mod kubernetes;

/// A source failed and cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The Kubernetes API cannot be used.
    #[error("kubernetes: {0}")]
    Api(String),
    /// The manifest directory cannot be read or watched.
    #[error("{path}: {message}")]
    Path {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// The future a source runs as.
pub type SourceTask = Pin<Box<dyn Future<Output = Result<(), SourceError>> + Send>>;

/// Told whether the source reaches its objects (`false` during an API server outage), on
/// every change.
pub type SourceUp = std::sync::Arc<dyn Fn(bool) + Send + Sync>;

/// A provider of Kubernetes objects.
pub trait Source: Send {
    /// What it reads, for logs.
    fn describe(&self) -> String;

    /// The Kubernetes API settings, for a source that reads the API.
    fn api(&self) -> Option<&kubernetes::Settings> {
        None
    }

    /// Runs until `out` closes, sending a snapshot at start and updates after every change,
    /// and telling `up` when it loses or regains its objects.
    fn run(self: Box<Self>, out: mpsc::Sender<Stamped>, up: SourceUp) -> SourceTask;
}

/// The source a `--source` argument names: `file:DIR` (the directory must exist) or
/// `kubernetes` (with these API settings).
pub fn from_arg(arg: &str, api: kubernetes::Settings) -> Result<Box<dyn Source>, String> {
    match arg.split_once(':') {
        Some(("file", dir)) if !dir.is_empty() => {
            if !std::path::Path::new(dir).is_dir() {
                return Err(format!("file source: {dir} is not a directory"));
            }
            Ok(Box::new(file::FileSource::new(dir)))
        }
        None if arg == "kubernetes" => Ok(Box::new(kubernetes::KubeSource::new(api))),
        _ => Err(format!(
            "unknown source {arg:?}: expected kubernetes, or file:DIR (a directory of Service \
             and EndpointSlice manifests)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_arguments() {
        let parse = |arg| from_arg(arg, kubernetes::Settings::default());
        let err = |arg| parse(arg).err().expect("rejected");
        assert!(parse("file:/").is_ok());
        assert!(parse("kubernetes").is_ok());
        assert!(err("file:/nonexistent/lb").contains("not a directory"));
        assert!(err("file:").contains("expected kubernetes, or file:DIR"));
        assert!(err("kubernetes:x").contains("expected kubernetes"));
    }
}
