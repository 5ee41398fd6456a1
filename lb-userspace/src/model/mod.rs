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
//!   `internalTrafficPolicy`) is decided by [`crate::model::endpoints::usable`]. External IPs reached
//!   from this node follow the internal policy, as kube-proxy does for node-local traffic;
//! - `sessionAffinity: ClientIP` keeps a client on its backend for
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800).
//!
//! A service that cannot be programmed as a whole (an invalid IP, a port out of range, an
//! unknown protocol or policy, too many backends) is a [`Rejection`]; the caller keeps what it
//! programmed before. A flaw in one endpoint only skips that endpoint, with a note.

pub mod endpoints;
pub mod maglev;
pub mod share;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use lb_common::{
    Backend, Endpoint, ServiceKey,
    service::{NAME_MAX, PORT_NAME_MAX},
};

use self::endpoints::{Candidate, NodeInfo, TrafficPolicy, usable};
use crate::addr::{to_addr6, to_endpoint};

/// Label naming the service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label of services (and their slices) that another proxy implements.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label of the EndpointSlices of headless services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Session affinity timeout when the service does not set one (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Longest session affinity timeout Kubernetes allows (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The namespace (`default` when the object has none).
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectRef {
    /// A reference from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The identity of an object, or `None` when it has no name.
    pub fn of(meta: &ObjectMeta) -> Option<Self> {
        let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
        Some(Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            name,
        ))
    }

    /// The service an EndpointSlice belongs to, from its label.
    pub fn owner_of_slice(slice: &EndpointSlice) -> Option<Self> {
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let slice_ref = Self::of(&slice.metadata)?;
        Some(Self::new(slice_ref.namespace, service.as_str()))
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Limits that apply to every service.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Most backends one frontend may have.
    pub max_backends_per_service: usize,
    /// Most frontends one service may have, socket-level and north-south together (cluster
    /// IPs, node ports on each node address, load-balancer and external IPs, times every
    /// port): a service over it is rejected, so that no tenant's service fills the shared
    /// maps for everyone.
    pub max_frontends_per_service: usize,
    /// Largest north-south Maglev table (a prime, at least the backend limit).
    pub max_table_size: u32,
    /// Table entries per backend a north-south service's table is sized for.
    pub entries_per_backend: u32,
}

impl Limits {
    /// The Maglev table size for a north-south service of `backends` backends.
    pub fn table_size(&self, backends: usize) -> u32 {
        crate::model::maglev::table_size(backends, self.entries_per_backend, self.max_table_size)
    }
}

/// A service's age, as claims compare it: its `creationTimestamp`, then its UID (services
/// without a timestamp, as hand-written manifests may be, come after all others). Never the
/// name: a tenant chooses names, not ages.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Age {
    unknown: bool,
    created: Option<jiff::Timestamp>,
    uid: String,
}

impl Age {
    /// The age of the object with metadata `meta`.
    pub fn of(meta: &ObjectMeta) -> Self {
        let created = meta.creation_timestamp.as_ref().map(|t| t.0);
        Self {
            unknown: created.is_none(),
            created,
            uid: meta.uid.clone().unwrap_or_default(),
        }
    }

    /// The age of a claim known only from the maps (a service adopted from an earlier run
    /// that is now rejected): after every known one.
    pub fn unknown() -> Self {
        Self {
            unknown: true,
            ..Self::default()
        }
    }
}

/// How a service claims one of its frontends. Among the services claiming one frontend the
/// smallest claim wins: a service's own address (its cluster IP, its node port on a node
/// address) before one it borrows (an external IP, a load-balancer ingress IP), then the
/// oldest service. So no service takes another's cluster IP or node port through its
/// `externalIPs`, and the winner does not depend on the order things happen in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Claim {
    /// An external IP or load-balancer ingress IP.
    pub borrowed: bool,
    /// The claiming service's age.
    pub age: Age,
}

/// One frontend as it should be programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// Cluster IP, port and protocol.
    pub key: ServiceKey,
    /// How the service claims it.
    pub claim: Claim,
    /// The service port's name (empty when unnamed).
    pub port_name: String,
    /// The backends for new connections, sorted, without duplicates.
    pub backends: Vec<Backend>,
    /// Session affinity timeout in seconds, zero for none.
    pub affinity_timeout_s: u32,
}

/// How traffic from outside reaches a north-south frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ExternalKind {
    /// A node address and the node port.
    NodePort,
    /// A load-balancer ingress IP and the service port.
    LoadBalancer,
    /// An external IP and the service port.
    ExternalIp,
}

/// One north-south frontend: an address, port and protocol traffic from outside arrives for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ExternalFrontend {
    /// Address, port and protocol.
    pub key: ServiceKey,
    /// What kind of address it is.
    pub kind: ExternalKind,
}

/// The north-south frontends of one service port and address family, which share their
/// backends (and so one Maglev table and one set of counters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalGroup {
    /// The service port's name (empty when unnamed).
    pub port_name: String,
    /// IPv6 (else IPv4).
    pub ipv6: bool,
    /// `externalTrafficPolicy: Local`: only this node's endpoints, the client address kept.
    pub local: bool,
    /// The backends of new flows, sorted, without duplicates.
    pub backends: Vec<Backend>,
    /// Every endpoint of the port and family in the slices, whatever its conditions (ready,
    /// serving, terminating), sorted: established flows to them are kept (draining), while
    /// the UDP flows of the others are removed so their clients move.
    pub endpoints: Vec<Endpoint>,
    /// The frontends, sorted, without duplicates; never empty.
    pub frontends: Vec<ExternalFrontend>,
    /// `sessionAffinity: ClientIP` timeout in seconds (zero: none): a client's new flows go
    /// to the backend of its last one while that backend stays in the table and the
    /// timeout has not run out since.
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` of this family when the service sets any (then sources
    /// outside them are dropped at its load-balancer IPs; an empty list admits none).
    pub source_ranges: Option<Vec<IpNet>>,
    /// The service's age, with which its frontends are claimed (see [`Claim`]).
    pub age: Age,
}

impl ExternalFrontend {
    /// How a service of age `age` claims this frontend.
    pub fn claim(&self, age: &Age) -> Claim {
        Claim {
            borrowed: self.kind != ExternalKind::NodePort,
            age: age.clone(),
        }
    }
}

/// The health check node port of a LoadBalancer service with `externalTrafficPolicy: Local`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    /// The port (`spec.healthCheckNodePort`).
    pub port: u16,
    /// Ready endpoints (distinct addresses) on this node.
    pub local_endpoints: usize,
}

/// What one service should look like in the datapath.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Its frontends for connections made on this node (socket hooks).
    pub frontends: Vec<DesiredFrontend>,
    /// Its north-south frontends for traffic from outside (XDP).
    pub external: Vec<ExternalGroup>,
    /// Its health check node port, if it has one.
    pub health_check: Option<HealthCheck>,
    /// Parts that were skipped and why (an unsupported protocol, a bad endpoint address).
    pub notes: Vec<String>,
    /// External IPs not honoured, and why (an address of this node, outside
    /// `--external-ip-cidrs`, or a special address): each is a warning to the service.
    pub refused: Vec<String>,
    /// Ports with more endpoints than the per-service limit, served by a stable subset:
    /// each is a warning to the service.
    pub limited: Vec<String>,
}

/// Why a service cannot be programmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// A name that does not fit the datapath's service-info record.
    #[error("{what} {value:?} is longer than {max} bytes")]
    NameTooLong {
        /// Which name.
        what: &'static str,
        /// The name.
        value: String,
        /// The limit.
        max: usize,
    },
    /// A cluster or external IP that is not a usable IP address.
    #[error("{what} {value:?} is not a valid IP address")]
    InvalidIp {
        /// `cluster IP` or `external IP`.
        what: &'static str,
        /// The value.
        value: String,
    },
    /// Two cluster IPs of one family.
    #[error("cluster IPs {0} and {1} are of the same family")]
    DuplicateFamily(IpAddr, IpAddr),
    /// A service port outside 1-65535.
    #[error("port {port} is out of range 1-65535")]
    InvalidPort {
        /// The port.
        port: i32,
    },
    /// A protocol other than TCP, UDP or SCTP.
    #[error("port {port} has unknown protocol {protocol:?}")]
    UnknownProtocol {
        /// The port.
        port: i32,
        /// The protocol.
        protocol: String,
    },
    /// The same port and protocol twice.
    #[error("port {port}/{protocol} is listed twice")]
    DuplicatePort {
        /// The port.
        port: u16,
        /// The protocol.
        protocol: String,
    },
    /// Two ports with the same name (the API requires unique names).
    #[error("port name {0:?} is used twice")]
    DuplicatePortName(String),
    /// A field with a value this proxy does not know.
    #[error("{field} {value:?} is not supported")]
    Unsupported {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// More frontends than one service may have.
    #[error(
        "{count} frontends (addresses times ports, both paths), over the limit of {limit} \
         (--max-frontends-per-service)"
    )]
    TooManyFrontends {
        /// How many it would have.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A change that would take its namespace over its share of a map (see
    /// [`crate::model::share`]).
    #[error(
        "its namespace would hold {used} entries of map {map}, over its share of {share} \
         (--namespace-share); it is programmed once the namespace frees room"
    )]
    NamespaceShare {
        /// The map.
        map: &'static str,
        /// What the namespace would hold.
        used: u64,
        /// Its share.
        share: u64,
    },
}

impl Rejection {
    /// A short, stable label for counting rejections by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NameTooLong { .. } => "name_too_long",
            Self::InvalidIp { .. } => "invalid_ip",
            Self::DuplicateFamily(..) => "duplicate_family",
            Self::InvalidPort { .. } => "invalid_port",
            Self::UnknownProtocol { .. } => "unknown_protocol",
            Self::DuplicatePort { .. } => "duplicate_port",
            Self::DuplicatePortName(_) => "duplicate_port_name",
            Self::Unsupported { .. } => "unsupported_value",
            Self::TooManyFrontends { .. } => "too_many_frontends",
            Self::NamespaceShare { .. } => "namespace_share",
        }
    }

    /// The reason of the Warning Event it gives: a service over its namespace's share is
    /// valid, and is programmed once there is room.
    pub fn event_reason(&self) -> &'static str {
        match self {
            Self::NamespaceShare { .. } => "NamespaceShareFull",
            _ => "InvalidService",
        }
    }
}

/// A validated service port.
struct Port<'a> {
    name: &'a str,
    port: u16,
    protocol: &'a str,
    proto: u8,
    /// Its node port, if it has one.
    node_port: Option<u16>,
}

/// An EndpointSlice reduced to what the model reads, owned. The store keeps this instead of
/// the object, which is several times larger (every endpoint's target reference, the
/// managed fields...), and changes to parts nobody reads do not dirty the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// The service it belongs to (its `kubernetes.io/service-name` label).
    pub owner: Option<ObjectRef>,
    /// `Some(ipv6)` for a slice a proxy balances; `None` for other address types (FQDN) and
    /// for slices of headless services or of another proxy.
    ipv6: Option<bool>,
    /// (name, protocol, port) of each valid slice port.
    ports: Vec<(String, String, u16)>,
    /// Its endpoints, with port 0 until matched to a service port.
    endpoints: Vec<Candidate>,
    /// What was skipped as invalid.
    notes: Vec<String>,
}

fn has_label(meta: &ObjectMeta, label: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(label))
}

/// The frontends of `svc` with their backends from `slices` (the slices labelled with the
/// service's name, in its namespace), for this node.
pub fn desired<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a Slice>,
    node: &NodeInfo,
    limits: &Limits,
) -> Result<Desired, Rejection> {
    let mut out = Desired::default();
    check_len(
        "namespace",
        svc.metadata.namespace.as_deref().unwrap_or(""),
        NAME_MAX,
    )?;
    check_len("name", svc.metadata.name.as_deref().unwrap_or(""), NAME_MAX)?;
    if has_label(&svc.metadata, SERVICE_PROXY_NAME_LABEL) {
        return Ok(out);
    }
    let Some(spec) = &svc.spec else {
        return Ok(out);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(out);
    }
    let Some(cluster) = cluster_ips(
        spec.cluster_ips.as_deref().unwrap_or_default(),
        spec.cluster_ip.as_deref(),
    )?
    else {
        return Ok(out); // headless
    };
    let mut external_ips: Vec<IpAddr> = Vec::new();
    for raw in spec.external_ips.iter().flatten() {
        let ip = parse_ip("external IP", raw)?;
        match refuse_external_ip(&ip, node) {
            Some(why) => out
                .refused
                .push(format!("external IP {ip} is not honoured: {why}")),
            None if !external_ips.contains(&ip) => external_ips.push(ip),
            None => {}
        }
    }
    let age = Age::of(&svc.metadata);
    let ports = service_ports(spec.ports.as_deref().unwrap_or_default(), &mut out.notes)?;
    let (internal, external) = traffic_policies(spec)?;
    let affinity_timeout_s = affinity_timeout(spec)?;
    let lb_ips = load_balancer_ips(svc, &mut out.notes);
    let source_ranges = source_ranges(spec, &mut out.notes);
    let node_ports = matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer"));
    if cluster.is_empty() || ports.is_empty() {
        return Ok(out);
    }
    if (internal == TrafficPolicy::Local || external == TrafficPolicy::Local) && node.name.is_none()
    {
        out.notes.push(
            "a Local traffic policy needs the agent's --node-name; no endpoint is local".into(),
        );
    }
    for ip in external_ips.iter().chain(&lb_ips) {
        if !cluster.iter().any(|c| c.is_ipv6() == ip.is_ipv6()) {
            out.notes.push(format!(
                "{ip} is not served: the service has no cluster IP of its family"
            ));
        }
    }
    // Connections from this node (its pods, its processes) to the service's node ports,
    // load-balancer IPs and external IPs get cluster-wide endpoints whatever both policies
    // say, as kube-proxy short-circuits them (its `UsesClusterEndpoints`): only traffic
    // from outside is held to this node's endpoints by `externalTrafficPolicy: Local`.
    let from_node = TrafficPolicy::Cluster;
    let slices: Vec<&Slice> = slices.into_iter().filter(|s| s.ipv6.is_some()).collect();
    for s in &slices {
        out.notes.extend(s.notes.iter().cloned());
    }

    // Endpoints (pods) on this node, counted once whatever their ports, as kube-proxy
    // counts them for the health check.
    let mut local_ready: BTreeSet<IpAddr> = BTreeSet::new();
    for port in &ports {
        // A family the service has no cluster IP of is not served at all: not its node
        // ports on the node's addresses of that family, nor external IPs of it (as
        // kube-proxy's per-family proxies do).
        for ipv6 in [false, true]
            .into_iter()
            .filter(|v6| cluster.iter().any(|ip| ip.is_ipv6() == *v6))
        {
            let candidates = candidates_for(ipv6, port, &slices);
            local_ready.extend(
                candidates
                    .iter()
                    .filter(|c| c.ready && c.node_name.is_some() && c.node_name == node.name)
                    .map(|c| c.ip),
            );
            let seed = xxhash_rust::xxh64::xxh64(
                format!(
                    "{}/{}:{}",
                    svc.metadata.namespace.as_deref().unwrap_or(""),
                    svc.metadata.name.as_deref().unwrap_or(""),
                    port.name
                )
                .as_bytes(),
                0,
            );
            let mut backends = |policy| -> Vec<Backend> {
                let all: Vec<Backend> = usable(&candidates, policy, node)
                    .into_iter()
                    .map(|c| c.backend(node))
                    .collect();
                let count = all.len();
                let b = stable_subset(all, seed, limits.max_backends_per_service);
                if b.len() < count {
                    let note = format!(
                        "port {:?} has {count} endpoints, over the limit of {} \
                         (--max-backends-per-service): a stable subset of {} serves it",
                        port.name,
                        limits.max_backends_per_service,
                        b.len()
                    );
                    if !out.limited.contains(&note) {
                        out.limited.push(note);
                    }
                }
                b
            };
            let family = |ips: &[IpAddr]| -> Vec<IpAddr> {
                ips.iter()
                    .filter(|ip| ip.is_ipv6() == ipv6)
                    .copied()
                    .collect()
            };
            let key = |ip: IpAddr, port_no: u16| {
                ServiceKey::new(to_addr6(ip), port_no.to_be(), port.proto)
            };
            // (key, policy, borrowed: see `Claim`)
            let mut socket: Vec<(ServiceKey, TrafficPolicy, bool)> = Vec::new();
            let mut ns: Vec<ExternalFrontend> = Vec::new();
            for ip in family(&cluster) {
                socket.push((key(ip, port.port), internal, false));
            }
            for (ips, kind) in [
                (&external_ips, ExternalKind::ExternalIp),
                (&lb_ips, ExternalKind::LoadBalancer),
            ] {
                for ip in family(ips) {
                    socket.push((key(ip, port.port), from_node, true));
                    ns.push(ExternalFrontend {
                        key: key(ip, port.port),
                        kind,
                    });
                }
            }
            if let Some(node_port) = port.node_port.filter(|_| node_ports) {
                for ip in family(&node.addresses) {
                    socket.push((key(ip, node_port), from_node, false));
                    ns.push(ExternalFrontend {
                        key: key(ip, node_port),
                        kind: ExternalKind::NodePort,
                    });
                }
            }
            let mut seen = BTreeSet::new();
            for (key, policy, borrowed) in socket {
                if !seen.insert(key) {
                    continue;
                }
                let backends = backends(policy);
                out.frontends.push(DesiredFrontend {
                    key,
                    claim: Claim {
                        borrowed,
                        age: age.clone(),
                    },
                    port_name: port.name.to_owned(),
                    backends,
                    affinity_timeout_s,
                });
            }
            let mut seen = BTreeSet::new();
            ns.retain(|f| seen.insert(f.key));
            if !ns.is_empty() {
                let backends = backends(external);
                ns.sort();
                let mut endpoints: Vec<Endpoint> = candidates
                    .iter()
                    .map(|c| to_endpoint((c.ip, c.port).into()))
                    .collect();
                endpoints.sort();
                endpoints.dedup();
                out.external.push(ExternalGroup {
                    port_name: port.name.to_owned(),
                    ipv6,
                    local: external == TrafficPolicy::Local,
                    backends,
                    endpoints,
                    frontends: ns,
                    affinity_timeout_s,
                    source_ranges: source_ranges.as_ref().map(|r| {
                        r.iter()
                            .filter(|n| n.addr().is_ipv6() == ipv6)
                            .copied()
                            .collect()
                    }),
                    age: age.clone(),
                });
            }
        }
    }
    let count = out.frontends.len()
        + out
            .external
            .iter()
            .map(|g| g.frontends.len())
            .sum::<usize>();
    if count > limits.max_frontends_per_service {
        return Err(Rejection::TooManyFrontends {
            count,
            limit: limits.max_frontends_per_service,
        });
    }
    if let Some(port) = health_check_port(spec, external) {
        out.health_check = Some(HealthCheck {
            port,
            local_endpoints: local_ready.len(),
        });
    }
    Ok(out)
}

/// Whether an endpoint gets new connections on one path, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verdict {
    /// It gets new connections.
    pub eligible: bool,
    /// Why (or why not).
    pub why: String,
}

impl From<Result<&'static str, String>> for Verdict {
    fn from(r: Result<&'static str, String>) -> Self {
        match r {
            Ok(why) => Self {
                eligible: true,
                why: why.into(),
            },
            Err(why) => Self {
                eligible: false,
                why,
            },
        }
    }
}

/// One endpoint of a service port, as `explain` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointExplanation {
    /// Address and target port.
    pub address: std::net::SocketAddr,
    /// Its node.
    pub node: Option<String>,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// For connections to the cluster IPs from this node (`internalTrafficPolicy`).
    pub cluster_ip: Verdict,
    /// For traffic from outside to node ports, load-balancer and external IPs
    /// (`externalTrafficPolicy`).
    pub external: Verdict,
}

/// One service port of one family, with every endpoint the slices list for it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortExplanation {
    /// The service port's name.
    pub port_name: String,
    /// Its number.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// `IPv4` or `IPv6`.
    pub family: String,
    /// `internalTrafficPolicy`.
    pub internal_policy: String,
    /// `externalTrafficPolicy`.
    pub external_policy: String,
    /// Notes on the service (skipped ports, invalid endpoint addresses...).
    pub notes: Vec<String>,
    /// The endpoints.
    pub endpoints: Vec<EndpointExplanation>,
}

/// Why each endpoint of each port of `svc` does or does not get new connections on this
/// node, by the same rules [`desired`] programs (connections from this node to external
/// addresses, which get cluster-wide endpoints as through kube-proxy, are not shown
/// apart).
pub fn explain<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a Slice>,
    node: &NodeInfo,
) -> Result<Vec<PortExplanation>, Rejection> {
    let Some(spec) = &svc.spec else {
        return Ok(Vec::new());
    };
    let mut notes = Vec::new();
    let ports = service_ports(spec.ports.as_deref().unwrap_or_default(), &mut notes)?;
    let (internal, external) = traffic_policies(spec)?;
    let cluster = cluster_ips(
        spec.cluster_ips.as_deref().unwrap_or_default(),
        spec.cluster_ip.as_deref(),
    )?
    .unwrap_or_default();
    let slices: Vec<&Slice> = slices.into_iter().filter(|s| s.ipv6.is_some()).collect();
    for s in &slices {
        notes.extend(s.notes.iter().cloned());
    }
    let name = |p: TrafficPolicy| format!("{p:?}");
    let mut out = Vec::new();
    for port in &ports {
        for ipv6 in [false, true]
            .into_iter()
            .filter(|v6| cluster.iter().any(|ip| ip.is_ipv6() == *v6))
        {
            let candidates = candidates_for(ipv6, port, &slices);
            let inside = endpoints::verdicts(&candidates, internal, node);
            let outside = endpoints::verdicts(&candidates, external, node);
            out.push(PortExplanation {
                port_name: port.name.to_owned(),
                port: port.port,
                protocol: port.protocol.to_owned(),
                family: if ipv6 { "IPv6" } else { "IPv4" }.into(),
                internal_policy: name(internal),
                external_policy: name(external),
                notes: notes.clone(),
                endpoints: inside
                    .into_iter()
                    .zip(outside)
                    .map(|((c, a), (_, b))| EndpointExplanation {
                        address: (c.ip, c.port).into(),
                        node: c.node_name.clone(),
                        ready: c.ready,
                        serving: c.serving,
                        terminating: c.terminating,
                        cluster_ip: a.into(),
                        external: b.into(),
                    })
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// At most `max` of `backends`, sorted: when there are more, those whose hash with `seed`
/// (the service port's identity) is highest (rendezvous hashing). The subset is the same on
/// every node and after every restart, and a backend that comes or goes changes it by at
/// most one, so a service over the limit follows its pods as they are replaced rather than
/// keep a stale table.
fn stable_subset(mut backends: Vec<Backend>, seed: u64, max: usize) -> Vec<Backend> {
    if backends.len() > max {
        let rank = |b: &Backend| {
            let mut bytes = b.addr.octets().to_vec();
            bytes.extend(b.port_be.to_ne_bytes());
            xxhash_rust::xxh64::xxh64(&bytes, seed)
        };
        backends.sort_by_key(|b| std::cmp::Reverse(rank(b)));
        backends.truncate(max);
    }
    backends.sort();
    backends
}

/// The service's load-balancer ingress IPs (type LoadBalancer), except those whose
/// `ipMode` is `Proxy`: their load balancer proxies to the nodes, so traffic arrives for the
/// node ports instead. Written by a controller, so a bad value is only skipped.
fn load_balancer_ips(svc: &Service, notes: &mut Vec<String>) -> Vec<IpAddr> {
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) != Some("LoadBalancer") {
        return Vec::new();
    }
    let mut ips = Vec::new();
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for i in ingress.into_iter().flatten() {
        if i.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        let Some(raw) = i.ip.as_deref().filter(|s| !s.is_empty()) else {
            continue; // a hostname: nothing to match in the datapath
        };
        match parse_ip("load-balancer IP", raw) {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(e) => notes.push(format!("{e}; skipped")),
        }
    }
    ips
}

/// `loadBalancerSourceRanges`, if set. An invalid range is skipped with a note; the others
/// still apply, so a service whose ranges are all invalid admits no source (fails closed).
fn source_ranges(spec: &ServiceSpec, notes: &mut Vec<String>) -> Option<Vec<IpNet>> {
    let raw = spec
        .load_balancer_source_ranges
        .as_ref()
        .filter(|r| !r.is_empty())?;
    let mut ranges = Vec::new();
    for r in raw {
        match r.trim().parse::<IpNet>() {
            Ok(net) => ranges.push(net.trunc()),
            Err(_) => notes.push(format!(
                "loadBalancerSourceRanges entry {r:?} is not a CIDR; skipped (the others apply)"
            )),
        }
    }
    ranges.sort();
    ranges.dedup();
    Some(ranges)
}

/// The health check node port of a LoadBalancer service with `externalTrafficPolicy:
/// Local`.
fn health_check_port(spec: &ServiceSpec, external: TrafficPolicy) -> Option<u16> {
    if spec.type_.as_deref() != Some("LoadBalancer") || external != TrafficPolicy::Local {
        return None;
    }
    spec.health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
}

fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), Rejection> {
    if value.len() > max {
        return Err(Rejection::NameTooLong {
            what,
            value: value.to_owned(),
            max,
        });
    }
    Ok(())
}

/// Why external IP `ip` is not honoured on `node`, if it is not: an address of the node
/// itself (the node's own ports are no tenant's to take), outside the node's
/// `--external-ip-cidrs`, or an address no external client reaches the node at (loopback,
/// link-local, multicast: the API server's validation refuses those too).
fn refuse_external_ip(ip: &IpAddr, node: &NodeInfo) -> Option<&'static str> {
    // (Unspecified and IPv4-mapped addresses never get here: `parse_ip` rejects them.)
    if !crate::addr::is_outside_unicast(ip) {
        Some("a loopback, link-local or multicast address")
    } else if node.addresses.contains(ip) || node.own_addresses.contains(ip) {
        Some("it is an address of this node")
    } else if !node.external_ip_cidrs.is_empty()
        && !node.external_ip_cidrs.iter().any(|c| c.contains(ip))
    {
        Some("outside the agent's --external-ip-cidrs")
    } else {
        None
    }
}

/// A usable service address: not unspecified, not a v4-mapped IPv6 address.
fn parse_ip(what: &'static str, raw: &str) -> Result<IpAddr, Rejection> {
    raw.parse()
        .ok()
        .filter(|ip: &IpAddr| !ip.is_unspecified() && ip.to_canonical() == *ip)
        .ok_or_else(|| Rejection::InvalidIp {
            what,
            value: raw.to_owned(),
        })
}

/// The service's cluster IPs, or `None` for a headless service.
fn cluster_ips(list: &[String], single: Option<&str>) -> Result<Option<Vec<IpAddr>>, Rejection> {
    let raw: Vec<&str> = if list.is_empty() {
        single.into_iter().collect()
    } else {
        list.iter().map(String::as_str).collect()
    };
    if raw.contains(&"None") {
        return Ok(None);
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    // An empty string is a cluster IP not allocated yet.
    for s in raw.into_iter().filter(|s| !s.is_empty()) {
        let ip = parse_ip("cluster IP", s)?;
        if let Some(other) = ips.iter().find(|o| o.is_ipv6() == ip.is_ipv6()) {
            return Err(Rejection::DuplicateFamily(*other, ip));
        }
        ips.push(ip);
    }
    Ok(Some(ips))
}

fn traffic_policy(field: &'static str, value: Option<&str>) -> Result<TrafficPolicy, Rejection> {
    match value {
        // "Cluster", and "Local" for the external policy, as the API's older spellings.
        None | Some("Cluster") => Ok(TrafficPolicy::Cluster),
        Some("Local") => Ok(TrafficPolicy::Local),
        Some(other) => Err(Rejection::Unsupported {
            field,
            value: other.to_owned(),
        }),
    }
}

/// `internalTrafficPolicy` and `externalTrafficPolicy`.
fn traffic_policies(spec: &ServiceSpec) -> Result<(TrafficPolicy, TrafficPolicy), Rejection> {
    Ok((
        traffic_policy(
            "internalTrafficPolicy",
            spec.internal_traffic_policy.as_deref(),
        )?,
        traffic_policy(
            "externalTrafficPolicy",
            spec.external_traffic_policy.as_deref(),
        )?,
    ))
}

fn affinity_timeout(spec: &ServiceSpec) -> Result<u32, Rejection> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => Ok(0),
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Ok(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) => u32::try_from(t)
                    .ok()
                    .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
                    .ok_or_else(|| Rejection::Unsupported {
                        field: "sessionAffinityConfig.clientIP.timeoutSeconds",
                        value: t.to_string(),
                    }),
            }
        }
        Some(other) => Err(Rejection::Unsupported {
            field: "sessionAffinity",
            value: other.to_owned(),
        }),
    }
}

fn service_ports<'a>(
    ports: &'a [ServicePort],
    notes: &mut Vec<String>,
) -> Result<Vec<Port<'a>>, Rejection> {
    let mut out: Vec<Port<'a>> = Vec::new();
    for p in ports {
        let name = p.name.as_deref().unwrap_or("");
        check_len("port name", name, PORT_NAME_MAX)?;
        let port = u16::try_from(p.port)
            .ok()
            .filter(|&n| n != 0)
            .ok_or(Rejection::InvalidPort { port: p.port })?;
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        let proto = match protocol {
            "TCP" => lb_common::proto::TCP,
            "UDP" => lb_common::proto::UDP,
            "SCTP" => {
                notes.push(format!(
                    "port {port}/SCTP skipped: the socket hooks balance TCP and UDP only"
                ));
                continue;
            }
            other => {
                return Err(Rejection::UnknownProtocol {
                    port: p.port,
                    protocol: other.to_owned(),
                });
            }
        };
        if out.iter().any(|o| o.port == port && o.proto == proto) {
            return Err(Rejection::DuplicatePort {
                port,
                protocol: protocol.to_owned(),
            });
        }
        if out.iter().any(|o| o.name == name) {
            return Err(Rejection::DuplicatePortName(name.to_owned()));
        }
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(u16::try_from(n).map_err(|_| Rejection::InvalidPort { port: n })?),
        };
        out.push(Port {
            name,
            port,
            protocol,
            proto,
            node_port,
        });
    }
    Ok(out)
}

impl Slice {
    /// The addresses of its endpoints, whatever their conditions.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.endpoints.iter().map(|c| c.ip)
    }

    /// The parts of `slice` the model reads.
    pub fn new(slice: &EndpointSlice) -> Self {
        let mut out = Self {
            owner: ObjectRef::owner_of_slice(slice),
            ipv6: None,
            ports: Vec::new(),
            endpoints: Vec::new(),
            notes: Vec::new(),
        };
        if has_label(&slice.metadata, HEADLESS_LABEL)
            || has_label(&slice.metadata, SERVICE_PROXY_NAME_LABEL)
        {
            return out;
        }
        if let Some((ipv6, ports, endpoints)) = parse_slice(slice, &mut out.notes) {
            out.ipv6 = Some(ipv6);
            out.ports = ports;
            out.endpoints = endpoints;
        }
        out
    }
}

/// A slice's family, valid ports and endpoints; invalid ones are noted and skipped.
type Parsed = (bool, Vec<(String, String, u16)>, Vec<Candidate>);

fn parse_slice(slice: &EndpointSlice, notes: &mut Vec<String>) -> Option<Parsed> {
    let name = slice.metadata.name.as_deref().unwrap_or("?");
    let ipv6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => return None, // FQDN slices are not balanced by a proxy
    };
    let mut ports = Vec::new();
    for p in slice.ports.iter().flatten() {
        let pname = p.name.as_deref().unwrap_or("");
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        match p
            .port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
        {
            Some(port) => ports.push((pname.to_owned(), protocol.to_owned(), port)),
            None => notes.push(format!(
                "EndpointSlice {name}: port {pname:?} has no valid number; skipped"
            )),
        }
    }
    let mut endpoints = Vec::new();
    for ep in slice.endpoints.iter().flatten() {
        // Addresses of one endpoint are fungible; like kube-proxy, use the first.
        let Some(raw) = ep.addresses.first() else {
            continue;
        };
        let ip = match raw.parse::<IpAddr>() {
            Ok(ip) if ip.is_ipv6() == ipv6 && ip.to_canonical() == ip && !ip.is_unspecified() => ip,
            _ => {
                notes.push(format!(
                    "EndpointSlice {name}: address {raw:?} is not a valid {} address; skipped",
                    if ipv6 { "IPv6" } else { "IPv4" }
                ));
                continue;
            }
        };
        let c = ep.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let hints = ep.hints.as_ref();
        endpoints.push(Candidate {
            ip,
            port: 0,
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
            node_name: ep.node_name.clone(),
            zone_hints: hints
                .and_then(|h| h.for_zones.as_ref())
                .map(|z| z.iter().map(|z| z.name.clone()).collect())
                .unwrap_or_default(),
            node_hints: hints
                .and_then(|h| h.for_nodes.as_ref())
                .map(|n| n.iter().map(|n| n.name.clone()).collect())
                .unwrap_or_default(),
        });
    }
    Some((ipv6, ports, endpoints))
}

/// How ready a candidate is, best first: where slices disagree about an endpoint, the
/// readiest copy wins.
fn rank(c: &Candidate) -> u8 {
    match (c.ready, c.serving && c.terminating) {
        (true, _) => 0,
        (false, true) => 1,
        (false, false) => 2,
    }
}

/// The endpoints of one family and service port across all slices, deduplicated.
fn candidates_for(ipv6: bool, port: &Port<'_>, slices: &[&Slice]) -> Vec<Candidate> {
    let mut merged: BTreeMap<(IpAddr, u16), Candidate> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.ipv6 == Some(ipv6)) {
        let Some(&(_, _, target)) = slice
            .ports
            .iter()
            .find(|(n, proto, _)| n == port.name && proto == port.protocol)
        else {
            continue;
        };
        for c in &slice.endpoints {
            let c = Candidate {
                port: target,
                ..c.clone()
            };
            match merged.get(&(c.ip, target)) {
                Some(existing) if rank(existing) <= rank(&c) => {}
                _ => {
                    merged.insert((c.ip, target), c);
                }
            }
        }
    }
    merged.into_values().collect()
}

/// This node as the endpoint rules see it: its name and the zone label of its Node object.
pub fn node_info(node_name: Option<&str>, labels: Option<&BTreeMap<String, String>>) -> NodeInfo {
    NodeInfo {
        name: node_name.map(String::from),
        zone: labels
            .and_then(|l| l.get(ZONE_LABEL))
            .filter(|z| !z.is_empty())
            .cloned(),
        addresses: Vec::new(),
        own_addresses: Vec::new(),
        external_ip_cidrs: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        addr::{frontend_string, to_socket_addr},
        testutil::{self, Ep, Port, ready},
    };

    const LIMITS: Limits = Limits {
        max_backends_per_service: 4,
        max_frontends_per_service: 4096,
        max_table_size: 251,
        entries_per_backend: 100,
    };

    /// [`super::desired`] of the slices as the store keeps them.
    fn desired<'a>(
        svc: &Service,
        slices: impl IntoIterator<Item = &'a EndpointSlice>,
        node: &NodeInfo,
        limits: &Limits,
    ) -> Result<Desired, Rejection> {
        let kept: Vec<Slice> = slices.into_iter().map(Slice::new).collect();
        super::desired(svc, &kept, node, limits)
    }

    fn service(ips: &[&str], ports: &[Port<'_>]) -> Service {
        testutil::service("prod", "web", ips, ports)
    }

    fn node() -> NodeInfo {
        NodeInfo {
            name: Some("n1".into()),
            zone: Some("a".into()),
            addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            ..NodeInfo::default()
        }
    }

    fn slice(family: &str, ports: &[Port<'_>], eps: &[Ep<'_>]) -> EndpointSlice {
        testutil::slice("prod", "web-abc", "web", family, ports, eps)
    }

    /// Frontends as strings: "VIP:port/PROTO -> [backends]".
    fn render(d: &Desired) -> Vec<String> {
        d.frontends
            .iter()
            .map(|f| {
                let bs: Vec<String> = f
                    .backends
                    .iter()
                    .map(|b| to_socket_addr(b).to_string())
                    .collect();
                format!("{} -> [{}]", frontend_string(&f.key), bs.join(" "))
            })
            .collect()
    }

    /// A service of `type_` with node ports: (name, port, protocol, node port).
    fn exposed(type_: &str, ips: &[&str], ports: &[(&str, i32, &str, i32)]) -> Service {
        let plain: Vec<Port<'_>> = ports
            .iter()
            .map(|(n, p, proto, _)| (*n, *p, *proto))
            .collect();
        let mut svc = service(ips, &plain);
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some(type_.into());
        for (p, (_, _, _, node_port)) in spec.ports.as_mut().unwrap().iter_mut().zip(ports) {
            p.node_port = Some(*node_port);
        }
        svc
    }

    fn with_ingress(mut svc: Service, ips: &[(&str, Option<&str>)]) -> Service {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    ips.iter()
                        .map(|(ip, mode)| LoadBalancerIngress {
                            ip: Some(ip.to_string()),
                            ip_mode: mode.map(str::to_string),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        });
        svc
    }

    fn on(ep: Ep<'_>, node: &str) -> EndpointSlice {
        let mut s = slice("IPv4", &[("http", 8080, "TCP")], &[ep]);
        s.endpoints.as_mut().unwrap()[0].node_name = Some(node.into());
        s
    }

    /// North-south groups as strings: "port/family policy [frontends] -> [backends] ranges".
    fn render_external(d: &Desired) -> Vec<String> {
        d.external
            .iter()
            .map(|g| {
                let fs: Vec<String> = g
                    .frontends
                    .iter()
                    .map(|f| format!("{}({:?})", frontend_string(&f.key), f.kind))
                    .collect();
                let bs: Vec<String> = g
                    .backends
                    .iter()
                    .map(|b| to_socket_addr(b).to_string())
                    .collect();
                let ranges = g.source_ranges.as_ref().map(|r| {
                    r.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                });
                format!(
                    "{}/{} {} [{}] -> [{}] {:?}",
                    g.port_name,
                    if g.ipv6 { "v6" } else { "v4" },
                    if g.local { "Local" } else { "Cluster" },
                    fs.join(" "),
                    bs.join(" "),
                    ranges
                )
            })
            .collect()
    }

    #[test]
    fn node_ports_are_served_on_every_node_address_of_the_family() {
        let svc = exposed(
            "NodePort",
            &["10.96.0.10", "fd00::10"],
            &[("http", 80, "TCP", 30080)],
        );
        let s4 = slice("IPv4", &[("http", 8080, "TCP")], &[ready("10.0.0.1")]);
        let s6 = slice("IPv6", &[("http", 8080, "TCP")], &[ready("fd00:1::1")]);
        let d = desired(&svc, [&s4, &s6], &node(), &LIMITS).unwrap();
        assert_eq!(
            render_external(&d),
            [
                "http/v4 Cluster [192.0.2.1:30080/TCP(NodePort)] -> [10.0.0.1:8080] None",
                "http/v6 Cluster [[2001:db8::1]:30080/TCP(NodePort)] -> [[fd00:1::1]:8080] None",
            ]
        );
        // Processes on the node reach the node ports through the socket hooks.
        let r = render(&d);
        assert!(
            r.contains(&"192.0.2.1:30080/TCP -> [10.0.0.1:8080]".to_string()),
            "{r:?}"
        );
        // A ClusterIP service's nodePort fields (left over from a type change) serve nothing.
        let mut clusterip = svc.clone();
        clusterip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let d = desired(&clusterip, [&s4], &node(), &LIMITS).unwrap();
        assert!(d.external.is_empty());
        // Without node addresses, there are no node-port frontends.
        let d = desired(&svc, [&s4], &NodeInfo::default(), &LIMITS).unwrap();
        assert!(d.external.is_empty());
    }

    #[test]
    fn load_balancer_ips_and_external_ips_share_a_group_per_port_and_family() {
        let mut svc = with_ingress(
            exposed(
                "LoadBalancer",
                &["10.96.0.10"],
                &[("http", 80, "TCP", 30080)],
            ),
            &[
                ("198.51.100.10", None),
                ("198.51.100.11", Some("Proxy")),
                ("bogus", None),
            ],
        );
        svc.spec.as_mut().unwrap().external_ips = Some(vec!["203.0.113.5".into()]);
        let s = slice(
            "IPv4",
            &[("http", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.2")],
        );
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(
            render_external(&d),
            [
                "http/v4 Cluster [192.0.2.1:30080/TCP(NodePort) 203.0.113.5:80/TCP(ExternalIp) \
              198.51.100.10:80/TCP(LoadBalancer)] -> [10.0.0.1:8080 10.0.0.2:8080] None"
            ]
        );
        // The Proxy-mode ingress is left to its load balancer; the bad one is noted.
        assert!(d.notes.iter().any(|n| n.contains("bogus")), "{:?}", d.notes);
        let r = render(&d);
        assert!(!r.iter().any(|f| f.starts_with("198.51.100.11")), "{r:?}");
    }

    #[test]
    fn external_traffic_policy_local_keeps_this_nodes_endpoints() {
        let mut svc = with_ingress(
            exposed(
                "LoadBalancer",
                &["10.96.0.10"],
                &[("http", 80, "TCP", 30080)],
            ),
            &[("198.51.100.10", None)],
        );
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32000);
        let here = on(ready("10.0.0.1"), "n1");
        let there = on(ready("10.0.0.2"), "n2");
        let d = desired(&svc, [&here, &there], &node(), &LIMITS).unwrap();
        assert_eq!(
            render_external(&d),
            [
                "http/v4 Local [192.0.2.1:30080/TCP(NodePort) 198.51.100.10:80/TCP(LoadBalancer)] \
              -> [10.0.0.1:8080] None"
            ]
        );
        assert_eq!(
            d.health_check,
            Some(HealthCheck {
                port: 32000,
                local_endpoints: 1
            })
        );
        // Connections from the node itself still reach every endpoint (the internal
        // policy is Cluster), as with kube-proxy.
        let r = render(&d);
        assert!(
            r.contains(&"198.51.100.10:80/TCP -> [10.0.0.1:8080 10.0.0.2:8080]".to_string()),
            "{r:?}"
        );
        // No local endpoint: the group stays, without backends (XDP drops), and the health
        // check reports none.
        let d = desired(&svc, [&there], &node(), &LIMITS).unwrap();
        assert!(d.external[0].backends.is_empty() && d.external[0].local);
        assert_eq!(d.health_check.unwrap().local_endpoints, 0);
        // The health check port belongs to LoadBalancer services with the Local policy only.
        svc.spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
        assert_eq!(
            desired(&svc, [&here], &node(), &LIMITS)
                .unwrap()
                .health_check,
            None
        );
    }

    #[test]
    fn health_checks_count_local_pods_once_whatever_their_ports() {
        let mut svc = exposed(
            "LoadBalancer",
            &["10.96.0.10"],
            &[("http", 80, "TCP", 30080), ("dns", 53, "UDP", 30053)],
        );
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32000);
        let mut s = slice(
            "IPv4",
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            &[
                ready("10.0.0.1"),
                ready("10.0.0.2"),
                ("10.0.0.3", Some(false), Some(false), Some(false)),
            ],
        );
        for ep in s.endpoints.as_mut().unwrap() {
            ep.node_name = Some("n1".into());
        }
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(d.health_check.unwrap().local_endpoints, 2);
    }

    #[test]
    fn source_ranges_apply_per_family_and_fail_closed() {
        let mut svc = with_ingress(
            exposed(
                "LoadBalancer",
                &["10.96.0.10", "fd00::10"],
                &[("http", 80, "TCP", 30080)],
            ),
            &[("198.51.100.10", None), ("2001:db8:100::10", None)],
        );
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec![
            "203.0.113.0/24".into(),
            "2001:db8:9::/48".into(),
            "10.1.2.3/8".into(),
        ]);
        let s4 = slice("IPv4", &[("http", 8080, "TCP")], &[ready("10.0.0.1")]);
        let s6 = slice("IPv6", &[("http", 8080, "TCP")], &[ready("fd00:1::1")]);
        let d = desired(&svc, [&s4, &s6], &node(), &LIMITS).unwrap();
        let ranges: Vec<_> = d
            .external
            .iter()
            .map(|g| g.source_ranges.clone().unwrap())
            .collect();
        assert_eq!(
            ranges,
            [
                vec![
                    "10.0.0.0/8".parse::<IpNet>().unwrap(),
                    "203.0.113.0/24".parse().unwrap()
                ],
                vec!["2001:db8:9::/48".parse().unwrap()],
            ]
        );
        // Only invalid ranges: the service admits no source rather than every source.
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["nonsense".into()]);
        let d = desired(&svc, [&s4], &node(), &LIMITS).unwrap();
        assert_eq!(d.external[0].source_ranges, Some(vec![]));
        assert!(d.notes.iter().any(|n| n.contains("nonsense")));
    }

    #[test]
    fn bad_external_fields_are_rejected_or_noted() {
        let mut svc = exposed("NodePort", &["10.96.0.10"], &[("http", 80, "TCP", 70000)]);
        assert!(matches!(
            desired(&svc, [], &node(), &LIMITS),
            Err(Rejection::InvalidPort { port: 70000 })
        ));
        svc = exposed("NodePort", &["10.96.0.10"], &[("http", 80, "TCP", 30080)]);
        svc.spec.as_mut().unwrap().external_traffic_policy = Some("Nearest".into());
        assert!(matches!(
            desired(&svc, [], &node(), &LIMITS),
            Err(Rejection::Unsupported {
                field: "externalTrafficPolicy",
                ..
            })
        ));
        svc = exposed(
            "NodePort",
            &["10.96.0.10"],
            &[("a", 80, "TCP", 30080), ("a", 81, "TCP", 30081)],
        );
        assert!(matches!(
            desired(&svc, [], &node(), &LIMITS),
            Err(Rejection::DuplicatePortName(_))
        ));
    }

    #[test]
    fn ports_match_slices_by_name_and_protocol() {
        let svc = service(
            &["10.96.0.10"],
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        );
        let s = slice(
            "IPv4",
            &[("dns", 5353, "UDP"), ("dns-tcp", 5354, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.2")],
        );
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(
            render(&d),
            [
                "10.96.0.10:53/UDP -> [10.0.0.1:5353 10.0.0.2:5353]",
                "10.96.0.10:53/TCP -> [10.0.0.1:5354 10.0.0.2:5354]",
            ]
        );
        assert_eq!(d.frontends[0].port_name, "dns");
    }

    #[test]
    fn only_ready_endpoints_while_any_is_ready() {
        let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let s = slice(
            "IPv4",
            &[("", 8080, "TCP")],
            &[
                ready("10.0.0.1"),
                ("10.0.0.2", Some(false), Some(false), Some(false)),
                ("10.0.0.3", Some(false), Some(true), Some(true)),
                // Unset conditions mean ready.
                ("10.0.0.4", None, None, None),
            ],
        );
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(
            render(&d),
            ["10.96.0.1:80/TCP -> [10.0.0.1:8080 10.0.0.4:8080]"]
        );
    }

    #[test]
    fn serving_terminating_endpoints_when_none_is_ready() {
        let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let s = slice(
            "IPv4",
            &[("", 8080, "TCP")],
            &[
                ("10.0.0.2", Some(false), Some(false), Some(true)),
                ("10.0.0.3", Some(false), Some(true), Some(true)),
            ],
        );
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.3:8080]"]);
    }

    #[test]
    fn no_usable_endpoint_is_a_frontend_without_backends() {
        let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let s = slice(
            "IPv4",
            &[("", 8080, "TCP")],
            &[("10.0.0.2", Some(false), Some(false), Some(false))],
        );
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> []"]);
        let d = desired(&svc, [], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> []"]);
    }

    #[test]
    fn slices_are_unioned_and_deduplicated() {
        let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let a = slice(
            "IPv4",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.2")],
        );
        let b = slice(
            "IPv4",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.2"), ready("10.0.0.3")],
        );
        let d = desired(&svc, [&a, &b], &node(), &LIMITS).unwrap();
        assert_eq!(
            render(&d),
            ["10.96.0.1:80/TCP -> [10.0.0.1:8080 10.0.0.2:8080 10.0.0.3:8080]"]
        );
    }

    #[test]
    fn dual_stack_uses_each_familys_slices() {
        let svc = service(&["10.96.0.1", "fd00:96::1"], &[("", 80, "TCP")]);
        let v4 = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
        let v6 = slice("IPv6", &[("", 8080, "TCP")], &[ready("fd00:244::1")]);
        let d = desired(&svc, [&v4, &v6], &node(), &LIMITS).unwrap();
        assert_eq!(
            render(&d),
            [
                "10.96.0.1:80/TCP -> [10.0.0.1:8080]",
                "[fd00:96::1]:80/TCP -> [[fd00:244::1]:8080]",
            ]
        );
    }

    #[test]
    fn headless_external_name_and_unallocated_have_no_frontends() {
        let mut svc = service(&["None"], &[("", 80, "TCP")]);
        assert_eq!(desired(&svc, [], &node(), &LIMITS).unwrap().frontends, []);
        svc.spec.as_mut().unwrap().cluster_ips = Some(vec![]);
        assert_eq!(desired(&svc, [], &node(), &LIMITS).unwrap().frontends, []);
        let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        svc.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        assert_eq!(desired(&svc, [], &node(), &LIMITS).unwrap().frontends, []);
    }

    #[test]
    fn single_cluster_ip_field_is_used_when_the_list_is_absent() {
        let mut svc = service(&[], &[("", 80, "TCP")]);
        let spec = svc.spec.as_mut().unwrap();
        spec.cluster_ips = None;
        spec.cluster_ip = Some("10.96.0.7".into());
        let d = desired(&svc, [], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.7:80/TCP -> []"]);
    }

    #[test]
    fn invalid_services_are_rejected() {
        let cases: [(Service, &str); 7] = [
            (service(&["10.96.0.300"], &[("", 80, "TCP")]), "invalid_ip"),
            (
                service(&["::ffff:10.0.0.1"], &[("", 80, "TCP")]),
                "invalid_ip",
            ),
            (
                service(&["10.0.0.1", "10.0.0.2"], &[("", 80, "TCP")]),
                "duplicate_family",
            ),
            (
                service(&["10.96.0.1"], &[("", 70000, "TCP")]),
                "invalid_port",
            ),
            (service(&["10.96.0.1"], &[("", 0, "TCP")]), "invalid_port"),
            (
                service(&["10.96.0.1"], &[("", 80, "QUIC")]),
                "unknown_protocol",
            ),
            (
                service(&["10.96.0.1"], &[("a", 80, "TCP"), ("b", 80, "TCP")]),
                "duplicate_port",
            ),
        ];
        for (svc, reason) in cases {
            let err = desired(&svc, [], &node(), &LIMITS).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
        }
    }

    #[test]
    fn a_service_over_the_frontend_limit_is_rejected() {
        // 2 ports x (a cluster IP, 3 external IPs): 8 socket frontends, 6 north-south ones.
        let mut svc = service(&["10.96.0.1"], &[("a", 80, "TCP"), ("b", 81, "TCP")]);
        svc.spec.as_mut().unwrap().external_ips = Some(
            ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
                .map(String::from)
                .to_vec(),
        );
        let at = |max| Limits {
            max_frontends_per_service: max,
            ..LIMITS
        };
        assert!(desired(&svc, [], &node(), &at(14)).is_ok());
        let err = desired(&svc, [], &node(), &at(13)).unwrap_err();
        assert_eq!(err.reason(), "too_many_frontends");
        assert!(err.to_string().starts_with("14 frontends"), "{err}");
    }

    #[test]
    fn a_port_over_the_backend_limit_is_served_by_a_stable_subset() {
        let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let of = |ids: &[u8]| -> Desired {
            let eps: Vec<String> = ids.iter().map(|i| format!("10.0.0.{i}")).collect();
            let eps: Vec<Ep<'_>> = eps.iter().map(|a| ready(a)).collect();
            let s = slice("IPv4", &[("", 8080, "TCP")], &eps);
            desired(&svc, [&s], &node(), &LIMITS).unwrap()
        };
        let served = |d: &Desired| -> BTreeSet<Backend> {
            d.frontends[0].backends.iter().copied().collect()
        };
        let d = of(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(d.frontends[0].backends.len(), 4, "the limit");
        assert_eq!(d.limited.len(), 1, "{:?}", d.limited);
        assert!(
            d.limited[0].contains("6 endpoints, over the limit of 4"),
            "{:?}",
            d.limited
        );
        // In any order, the same subset; a pod replaced changes it by one at most.
        assert_eq!(served(&of(&[6, 5, 4, 3, 2, 1])), served(&d));
        let gone = *served(&d).iter().next().unwrap();
        let gone_last = gone.addr.octets()[15];
        let rest: Vec<u8> = (1..=6).filter(|i| *i != gone_last).chain([7]).collect();
        let after = served(&of(&rest));
        assert_eq!(after.len(), 4);
        assert_eq!(
            served(&d).difference(&after).count(),
            1,
            "{d:?} -> {after:?}"
        );
        // Under the limit: every endpoint, no warning.
        let d = of(&[1, 2]);
        assert_eq!(d.frontends[0].backends.len(), 2);
        assert!(d.limited.is_empty());
    }

    #[test]
    fn sctp_ports_are_skipped_with_a_note() {
        let svc = service(&["10.96.0.1"], &[("a", 80, "TCP"), ("b", 90, "SCTP")]);
        let d = desired(&svc, [], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> []"]);
        assert_eq!(d.notes.len(), 1, "{:?}", d.notes);
    }

    #[test]
    fn bad_endpoint_addresses_are_skipped_with_a_note() {
        let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let s = slice(
            "IPv4",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("fd00::1"), ready("10.0.0.999")],
        );
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.1:8080]"]);
        assert_eq!(d.notes.len(), 2, "{:?}", d.notes);
    }

    #[test]
    fn long_names_are_rejected() {
        let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        svc.metadata.name = Some("x".repeat(64));
        assert_eq!(
            desired(&svc, [], &node(), &LIMITS).unwrap_err().reason(),
            "name_too_long"
        );
    }

    #[test]
    fn services_of_another_proxy_and_headless_slices_are_ignored() {
        let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let s = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
        let mut headless = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.2")]);
        headless
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(HEADLESS_LABEL.into(), "".into());
        let d = desired(&svc, [&s, &headless], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.1:8080]"]);
        svc.metadata.labels =
            Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "other".to_string())].into());
        assert_eq!(desired(&svc, [&s], &node(), &LIMITS).unwrap().frontends, []);
    }

    #[test]
    fn external_ips_are_frontends_with_the_same_backends() {
        let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        svc.spec.as_mut().unwrap().external_ips = Some(vec![
            "192.0.2.10".into(),
            "10.96.0.1".into(),
            "2001:db8::10".into(),
        ]);
        let v4 = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
        let v6 = slice("IPv6", &[("", 8080, "TCP")], &[ready("fd00::1")]);
        let d = desired(&svc, [&v4, &v6], &node(), &LIMITS).unwrap();
        assert_eq!(
            render(&d),
            [
                "10.96.0.1:80/TCP -> [10.0.0.1:8080]",
                "192.0.2.10:80/TCP -> [10.0.0.1:8080]",
            ]
        );
        // The IPv6 external IP of a service without an IPv6 cluster IP is not served, as
        // kube-proxy serves a family only for services with a cluster IP of it.
        assert!(
            d.notes.iter().any(|n| n.contains("2001:db8::10")),
            "{:?}",
            d.notes
        );
        svc.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.300".into()]);
        let err = desired(&svc, [], &node(), &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "external IP \"192.0.2.300\" is not a valid IP address"
        );
    }

    #[test]
    fn external_ips_of_the_node_special_or_outside_the_cidrs_are_refused() {
        let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        svc.spec.as_mut().unwrap().external_ips = Some(
            [
                "192.0.2.1",   // serves node ports
                "10.1.2.3",    // another address of the node
                "127.0.0.1",   // loopback
                "169.254.1.1", // link-local
                "198.51.100.7",
                "203.0.113.9",
            ]
            .map(String::from)
            .to_vec(),
        );
        let mut node = node();
        node.own_addresses = vec!["10.1.2.3".parse().unwrap()];
        node.external_ip_cidrs = vec![
            "203.0.113.0/24".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ];
        let s = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
        let d = desired(&svc, [&s], &node, &LIMITS).unwrap();
        assert_eq!(
            render(&d),
            [
                "10.96.0.1:80/TCP -> [10.0.0.1:8080]",
                "203.0.113.9:80/TCP -> [10.0.0.1:8080]",
            ]
        );
        assert_eq!(
            d.refused,
            [
                "external IP 192.0.2.1 is not honoured: it is an address of this node",
                "external IP 10.1.2.3 is not honoured: it is an address of this node",
                "external IP 127.0.0.1 is not honoured: a loopback, link-local or multicast address",
                "external IP 169.254.1.1 is not honoured: a loopback, link-local or multicast address",
                "external IP 198.51.100.7 is not honoured: outside the agent's --external-ip-cidrs",
            ]
        );
        // The cluster IP is the service's own; the external IP is borrowed (see `Claim`).
        let borrowed: Vec<bool> = d.frontends.iter().map(|f| f.claim.borrowed).collect();
        assert_eq!(borrowed, [false, true]);
    }

    #[test]
    fn internal_traffic_policy_local_uses_this_nodes_endpoints() {
        let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        let mut s = slice(
            "IPv4",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.2")],
        );
        s.endpoints.as_mut().unwrap()[1].node_name = Some("n1".into());
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.2:8080]"]);
        // Without a node name nothing is local, and the notes say why.
        let d = desired(&svc, [&s], &NodeInfo::default(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> []"]);
        assert!(d.notes[0].contains("--node-name"), "{:?}", d.notes);
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Nearby".into());
        assert_eq!(
            desired(&svc, [&s], &node(), &LIMITS).unwrap_err().reason(),
            "unsupported_value"
        );
    }

    #[test]
    fn traffic_from_this_node_to_external_addresses_gets_cluster_endpoints() {
        // kube-proxy's short circuit: whatever both policies say, this node's pods and
        // processes reach a service's node port and external addresses through
        // cluster-wide endpoints; from outside, eTP Local holds them to this node's.
        // (internal, external, local endpoint?) -> (cluster IP, node port from the node,
        // from outside)
        let cases = [
            (
                ("Cluster", "Local", true),
                (
                    "[10.0.0.1:8080 10.0.0.2:8080]",
                    "[10.0.0.1:8080 10.0.0.2:8080]",
                    1,
                ),
            ),
            (
                ("Local", "Local", true),
                ("[10.0.0.2:8080]", "[10.0.0.1:8080 10.0.0.2:8080]", 1),
            ),
            (
                ("Local", "Local", false),
                ("[]", "[10.0.0.1:8080 10.0.0.2:8080]", 0),
            ),
            (
                ("Local", "Cluster", false),
                ("[]", "[10.0.0.1:8080 10.0.0.2:8080]", 2),
            ),
        ];
        for ((internal, external, local), (cluster, node_port, outside)) in cases {
            let mut svc = exposed("NodePort", &["10.96.0.1"], &[("http", 80, "TCP", 30080)]);
            let spec = svc.spec.as_mut().unwrap();
            spec.internal_traffic_policy = Some(internal.into());
            spec.external_traffic_policy = Some(external.into());
            spec.external_ips = Some(vec!["203.0.113.5".into()]);
            let mut s = slice(
                "IPv4",
                &[("http", 8080, "TCP")],
                &[ready("10.0.0.1"), ready("10.0.0.2")],
            );
            s.endpoints.as_mut().unwrap()[1].node_name =
                Some(if local { "n1" } else { "n2" }.into());
            let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
            let case = format!("iTP {internal}, eTP {external}, local {local}");
            let of = |frontend: &str| -> String {
                render(&d)
                    .into_iter()
                    .find_map(|r| r.strip_prefix(&format!("{frontend} -> ")).map(String::from))
                    .unwrap_or_else(|| panic!("{case}: no {frontend}"))
            };
            assert_eq!(of("10.96.0.1:80/TCP"), cluster, "{case}");
            assert_eq!(of("192.0.2.1:30080/TCP"), node_port, "{case}");
            assert_eq!(of("203.0.113.5:80/TCP"), node_port, "{case}");
            assert_eq!(d.external[0].backends.len(), outside, "{case}");
        }
    }

    #[test]
    fn explain_gives_every_endpoint_a_verdict_per_path_that_agrees_with_desired() {
        let mut svc = exposed("NodePort", &["10.96.0.1"], &[("http", 80, "TCP", 30080)]);
        svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
        let mut s = slice(
            "IPv4",
            &[("http", 8080, "TCP")],
            &[
                ready("10.0.0.1"),
                ready("10.0.0.2"),
                ("10.0.0.3", Some(false), Some(false), Some(false)),
            ],
        );
        s.endpoints.as_mut().unwrap()[1].node_name = Some("n1".into());
        let kept = [Slice::new(&s)];
        let ports = explain(&svc, &kept, &node()).unwrap();
        assert_eq!(ports.len(), 1);
        let p = &ports[0];
        assert_eq!(
            (
                p.port_name.as_str(),
                p.family.as_str(),
                p.external_policy.as_str()
            ),
            ("http", "IPv4", "Local")
        );
        let table: Vec<(String, bool, bool)> = p
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.address.to_string(),
                    e.cluster_ip.eligible,
                    e.external.eligible,
                )
            })
            .collect();
        assert_eq!(
            table,
            [
                ("10.0.0.1:8080".to_string(), true, false),
                ("10.0.0.2:8080".to_string(), true, true),
                ("10.0.0.3:8080".to_string(), false, false),
            ]
        );
        assert!(
            p.endpoints[0]
                .external
                .why
                .contains("traffic policy is Local")
        );
        assert_eq!(p.endpoints[2].cluster_ip.why, "not ready");
        // The same endpoints as the programmed frontends have.
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        // (The node port from this node's own processes gets cluster-wide endpoints, as
        // kube-proxy gives them.)
        assert_eq!(
            render(&d)[0],
            "10.96.0.1:80/TCP -> [10.0.0.1:8080 10.0.0.2:8080]"
        );
        assert_eq!(d.external[0].backends.len(), 1);
    }

    #[test]
    fn zone_hints_steer_to_this_zone() {
        use k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
        let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let mut s = slice(
            "IPv4",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.2")],
        );
        for (ep, zone) in s.endpoints.as_mut().unwrap().iter_mut().zip(["a", "b"]) {
            ep.hints = Some(EndpointHints {
                for_zones: Some(vec![ForZone { name: zone.into() }]),
                for_nodes: None,
            });
        }
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.1:8080]"]);
    }

    #[test]
    fn session_affinity_timeouts() {
        use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
        let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
        let timeout = |svc: &Service| {
            desired(svc, [], &node(), &LIMITS).map(|d| d.frontends[0].affinity_timeout_s)
        };
        assert_eq!(timeout(&svc), Ok(0));
        let spec = svc.spec.as_mut().unwrap();
        spec.session_affinity = Some("ClientIP".into());
        assert_eq!(timeout(&svc), Ok(DEFAULT_AFFINITY_TIMEOUT_S));
        for (t, ok) in [
            (60, true),
            (86_400, true),
            (0, false),
            (86_401, false),
            (-1, false),
        ] {
            svc.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
                client_ip: Some(ClientIPConfig {
                    timeout_seconds: Some(t),
                }),
            });
            assert_eq!(timeout(&svc).is_ok(), ok, "timeout {t}");
        }
        svc.spec.as_mut().unwrap().session_affinity = Some("Cookie".into());
        assert!(timeout(&svc).is_err());
    }

    #[test]
    fn node_info_reads_the_zone_label() {
        let labels = [(ZONE_LABEL.to_string(), "z1".to_string())].into();
        assert_eq!(
            node_info(Some("n1"), Some(&labels)).zone.as_deref(),
            Some("z1")
        );
        let empty = [(ZONE_LABEL.to_string(), String::new())].into();
        assert_eq!(node_info(Some("n1"), Some(&empty)).zone, None);
    }

    #[test]
    fn slice_owner_comes_from_the_label() {
        let s = slice("IPv4", &[], &[]);
        assert_eq!(
            ObjectRef::owner_of_slice(&s),
            Some(ObjectRef::new("prod", "web"))
        );
    }
}
