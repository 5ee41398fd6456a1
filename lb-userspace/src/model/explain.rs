//! [`explain`]: why each endpoint of a service does or does not get new connections on this
//! node, by the rules [`super::desired`] programs (`lbctl explain` shows it).

use k8s_openapi::api::core::v1::Service;

use super::{
    endpoints::{self, NodeInfo, TrafficPolicy},
    proxied::{self, Proxied},
    slice::{Slice, candidates_for},
    validate::Rejection,
};

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

/// A service's explanation: what the agent answers on `/explain/NAMESPACE/NAME`, and what
/// `lbctl explain` reads and shows.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceExplanation {
    /// `namespace/name`.
    pub service: String,
    /// Why the service is not programmed, when it is rejected (its ports are then empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    /// Each port and family, with its endpoints.
    pub ports: Vec<PortExplanation>,
}

/// Why each endpoint of each port of `svc` does or does not get new connections on this
/// node, by the same rules [`super::desired`] programs (connections from this node to external
/// addresses, which get cluster-wide endpoints as through kube-proxy, are not shown
/// apart).
pub fn explain<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a Slice>,
    node: &NodeInfo,
) -> Result<Vec<PortExplanation>, Rejection> {
    let Some(Proxied {
        cluster,
        ports,
        internal,
        external,
        slices,
        notes,
        ..
    }) = proxied::read(svc, slices, node)?
    else {
        return Ok(Vec::new());
    };
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
