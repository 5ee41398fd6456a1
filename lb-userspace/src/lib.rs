//! The userspace side of the load balancer: the agent that keeps the kernel's maps equal to
//! what the Kubernetes objects ask for, and the CLI that reads those maps.
//!
//! The agent is a pipeline:
//!
//! ```text
//! source (files; the API later) --Snapshot--> store --dirty services--> model (pure)
//!     --desired frontends--> reconcile (diff against a mirror of the maps, ordered ops)
//!     --> datapath (pinned BPF maps, or the in-memory fake in tests) <-- kernel programs
//! ```
//!
//! Pure logic ([`model`], [`store`], [`reconcile`], [`inspect`]) does no I/O, so it is
//! unit-tested without a kernel or a cluster.

pub mod addr;
pub mod agent;
pub mod config;
pub mod conntrack;
pub mod datapath;
pub mod endpoints;
pub mod events;
pub mod health;
pub mod healthcheck;
pub mod host;
pub mod inspect;
pub mod loader;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod netdev;
pub mod packet;
pub mod privileges;
pub mod reconcile;
pub mod share;
pub mod sockets;
pub mod source;
pub mod store;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod testutil;

/// The kernel object (`lb-ebpf`), built by `cargo xtask build-ebpf` and embedded here.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));
