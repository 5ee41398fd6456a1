//! [`desired`]: a Service and its EndpointSlices, as the frontends and backends this node
//! programs, and the limits and claims that shape them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use lb_common::{Backend, Endpoint, ServiceKey};

use super::{
    endpoints::{NodeInfo, TrafficPolicy, usable},
    proxied::{self, Proxied},
    slice::{Slice, candidates_for},
    validate::{Rejection, health_check_port},
};
use crate::{
    addr::{to_addr6, to_endpoint},
    k8s::object::{Age, ZONE_LABEL},
};

/// Session affinity timeout when the service does not set one (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Longest session affinity timeout Kubernetes allows (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

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

/// The frontends of `svc` with their backends from `slices` (the slices labelled with the
/// service's name, in its namespace), for this node.
pub fn desired<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a Slice>,
    node: &NodeInfo,
    limits: &Limits,
) -> Result<Desired, Rejection> {
    let mut out = Desired::default();
    let Some(mut p) = proxied::read(svc, slices, node)? else {
        return Ok(out);
    };
    out.notes = std::mem::take(&mut p.notes);
    out.refused = std::mem::take(&mut p.refused);
    if !p.serves() {
        return Ok(out);
    }
    let Proxied {
        spec,
        age,
        cluster,
        external_ips,
        lb_ips,
        ports,
        internal,
        external,
        affinity_timeout_s,
        source_ranges,
        node_ports,
        slices,
        ..
    } = p;
    // Connections from this node (its pods, its processes) to the service's node ports,
    // load-balancer IPs and external IPs get cluster-wide endpoints whatever both policies
    // say, as kube-proxy short-circuits them (its `UsesClusterEndpoints`): only traffic
    // from outside is held to this node's endpoints by `externalTrafficPolicy: Local`.
    let from_node = TrafficPolicy::Cluster;

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
            let mut external_frontends: Vec<ExternalFrontend> = Vec::new();
            for ip in family(&cluster) {
                socket.push((key(ip, port.port), internal, false));
            }
            for (ips, kind) in [
                (&external_ips, ExternalKind::ExternalIp),
                (&lb_ips, ExternalKind::LoadBalancer),
            ] {
                for ip in family(ips) {
                    socket.push((key(ip, port.port), from_node, true));
                    external_frontends.push(ExternalFrontend {
                        key: key(ip, port.port),
                        kind,
                    });
                }
            }
            if let Some(node_port) = port.node_port.filter(|_| node_ports) {
                for ip in family(&node.addresses) {
                    socket.push((key(ip, node_port), from_node, false));
                    external_frontends.push(ExternalFrontend {
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
            external_frontends.retain(|f| seen.insert(f.key));
            if !external_frontends.is_empty() {
                let backends = backends(external);
                external_frontends.sort();
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
                    frontends: external_frontends,
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
