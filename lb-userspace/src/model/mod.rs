//! What the datapath should hold for one Kubernetes service: pure, no I/O.
//!
//! [`desired`] turns a Service and its EndpointSlices into frontends, each with the backends
//! that get new connections from this node, following kube-proxy:
//! - frontends are every cluster IP (`clusterIPs`, else `clusterIP`) and external IP of the
//!   service, times every port; each address family is served by the EndpointSlices of its
//!   own address type. Headless and ExternalName services, and services labelled
//!   `service.kubernetes.io/service-proxy-name` (another proxy's), have none;
//! - service ports match EndpointSlice ports by name and protocol, so a `targetPort` given by
//!   name works: the slice carries the resolved number;
//! - the endpoints of a service are the union of its slices, deduplicated by address and port
//!   (the readiest copy wins); slices labelled `service.kubernetes.io/headless` or
//!   `service.kubernetes.io/service-proxy-name` are ignored;
//! - which endpoints get traffic (readiness, graceful termination, topology hints,
//!   `internalTrafficPolicy`) is decided by [`endpoints::usable`]. External IPs reached from
//!   this node follow the internal policy, as kube-proxy does for node-local traffic;
//! - `sessionAffinity: ClientIP` keeps a client on its backend for
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800).
//!
//! A service that cannot be programmed as a whole (an invalid IP, a port out of range, an
//! unknown protocol or policy, too many frontends, its namespace over its share) is a
//! [`Rejection`]; the caller keeps what it programmed before. A flaw in one endpoint only
//! skips that endpoint, with a note.
//!
//! The files: `proxied` (a service read and validated, the start of both `desired` and
//! `explain`), `desired` (the frontends and what shapes them), `validate` (the spec's checks),
//! `slice` (EndpointSlices as the model reads them), [`endpoints`] (which endpoints get
//! traffic), [`maglev`] (north-south tables), `explain` (why, endpoint by endpoint), and
//! [`share`] (each namespace's share of the maps).

pub mod endpoints;
pub mod maglev;
pub mod share;

mod desired;
mod explain;
mod proxied;
mod slice;
mod validate;

pub use desired::{
    Claim, DEFAULT_AFFINITY_TIMEOUT_S, Desired, DesiredFrontend, ExternalFrontend, ExternalGroup,
    ExternalKind, HealthCheck, Limits, MAX_AFFINITY_TIMEOUT_S, desired, node_info,
};
pub use explain::{EndpointExplanation, PortExplanation, ServiceExplanation, Verdict, explain};
pub use slice::Slice;
pub use validate::Rejection;

#[cfg(test)]
mod tests;
