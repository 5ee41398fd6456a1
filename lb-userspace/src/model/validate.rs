//! Validation of a Service's spec: what makes a service a [`Rejection`], and the parsed
//! parts ([`Port`]s, policies, addresses) the model builds on.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use lb_common::service::PORT_NAME_MAX;

use super::{
    desired::{DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S},
    endpoints::{NodeInfo, TrafficPolicy},
};

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
pub(super) struct Port<'a> {
    pub(super) name: &'a str,
    pub(super) port: u16,
    pub(super) protocol: &'a str,
    pub(super) proto: u8,
    /// Its node port, if it has one.
    pub(super) node_port: Option<u16>,
}

/// The service's load-balancer ingress IPs (type LoadBalancer), except those whose
/// `ipMode` is `Proxy`: their load balancer proxies to the nodes, so traffic arrives for the
/// node ports instead. Written by a controller, so a bad value is only skipped.
pub(super) fn load_balancer_ips(svc: &Service, notes: &mut Vec<String>) -> Vec<IpAddr> {
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
pub(super) fn source_ranges(spec: &ServiceSpec, notes: &mut Vec<String>) -> Option<Vec<IpNet>> {
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
pub(super) fn health_check_port(spec: &ServiceSpec, external: TrafficPolicy) -> Option<u16> {
    if spec.type_.as_deref() != Some("LoadBalancer") || external != TrafficPolicy::Local {
        return None;
    }
    spec.health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
}

pub(super) fn check_len(what: &'static str, value: &str, max: usize) -> Result<(), Rejection> {
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
pub(super) fn refuse_external_ip(ip: &IpAddr, node: &NodeInfo) -> Option<&'static str> {
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
pub(super) fn parse_ip(what: &'static str, raw: &str) -> Result<IpAddr, Rejection> {
    raw.parse()
        .ok()
        .filter(|ip: &IpAddr| !ip.is_unspecified() && ip.to_canonical() == *ip)
        .ok_or_else(|| Rejection::InvalidIp {
            what,
            value: raw.to_owned(),
        })
}

/// The service's cluster IPs, or `None` for a headless service.
pub(super) fn cluster_ips(
    list: &[String],
    single: Option<&str>,
) -> Result<Option<Vec<IpAddr>>, Rejection> {
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

pub(super) fn traffic_policy(
    field: &'static str,
    value: Option<&str>,
) -> Result<TrafficPolicy, Rejection> {
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
pub(super) fn traffic_policies(
    spec: &ServiceSpec,
) -> Result<(TrafficPolicy, TrafficPolicy), Rejection> {
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

pub(super) fn affinity_timeout(spec: &ServiceSpec) -> Result<u32, Rejection> {
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

pub(super) fn service_ports<'a>(
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
