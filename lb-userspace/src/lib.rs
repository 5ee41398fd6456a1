//! The userspace side of the load balancer: the agent that keeps the kernel's maps equal to
//! what the Kubernetes objects ask for, and the CLI that reads those maps.
//!
//! The agent is a pipeline, and each stage is a folder:
//!
//! ```text
//! k8s        sources (API watches, manifest files) --updates--> store (reduced objects)
//!  | services that changed
//! model      desired frontends of each service (validation, endpoint selection, Maglev,
//!  |         namespace shares); explanations
//!  | desired state
//! reconcile  diff against a mirror of the maps, ordered writes, grace periods
//!  | ops
//! datapath   the Datapath trait: pinned BPF maps, or an in-memory fake; conntrack sweeps
//!  ^
//! loader     loading, pinning, migrating and attaching the kernel programs
//! agent      the loop that runs it all, and health, metrics, events, stale sockets
//! cli        lbctl's views of the pinned maps
//! ```
//!
//! [`k8s::store`], [`model`] and [`reconcile`] are pure logic: no I/O, unit-tested without a
//! kernel or a cluster. [`addr`] holds the address conversions every stage shares.

pub mod addr;
pub mod agent;
pub mod cli;
pub mod datapath;
pub mod k8s;
pub mod loader;
pub mod model;
pub mod reconcile;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod testutil;

/// The kernel object (`lb-ebpf`), built by `cargo xtask build-ebpf` and embedded here.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));
