//! [`read`]: a Service as the proxy reads it, before any endpoint is judged. Both
//! [`super::desired`] (what to program) and [`super::explain`] (why) start here, so they
//! refuse the same services for the same reason and see the same ports, policies and notes.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use lb_common::service::NAME_MAX;

use super::{
    endpoints::{NodeInfo, TrafficPolicy},
    slice::Slice,
    validate::{
        Port, Rejection, affinity_timeout, check_len, cluster_ips, load_balancer_ips, parse_ip,
        refuse_external_ip, service_ports, source_ranges, traffic_policies,
    },
};
use crate::k8s::object::{Age, SERVICE_PROXY_NAME_LABEL, has_label};

/// A service this agent proxies, its spec validated.
pub(super) struct Proxied<'s, 'a> {
    pub(super) spec: &'s ServiceSpec,
    pub(super) age: Age,
    /// Its cluster IPs, one per family at most.
    pub(super) cluster: Vec<IpAddr>,
    /// Its external IPs that are honoured, deduplicated.
    pub(super) external_ips: Vec<IpAddr>,
    /// Its load-balancer ingress IPs that traffic arrives for (not `ipMode: Proxy`).
    pub(super) lb_ips: Vec<IpAddr>,
    pub(super) ports: Vec<Port<'s>>,
    pub(super) internal: TrafficPolicy,
    pub(super) external: TrafficPolicy,
    pub(super) affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges`, if it restricts the clients.
    pub(super) source_ranges: Option<Vec<IpNet>>,
    /// It is of a type that opens node ports (NodePort, LoadBalancer).
    pub(super) node_ports: bool,
    /// Its slices whose address type the model reads.
    pub(super) slices: Vec<&'a Slice>,
    /// What the service's owner should know: each is a warning to the service.
    pub(super) notes: Vec<String>,
    /// External IPs not honoured, and why.
    pub(super) refused: Vec<String>,
}

impl Proxied<'_, '_> {
    /// It has frontends: a cluster IP and a port.
    pub(super) fn serves(&self) -> bool {
        !self.cluster.is_empty() && !self.ports.is_empty()
    }
}

/// `svc` read and validated, or `None` when this agent does not proxy it (another proxy's,
/// no spec, ExternalName or headless). The checks run in a fixed order, so a service with
/// several flaws is always refused for the same one.
pub(super) fn read<'s, 'a>(
    svc: &'s Service,
    slices: impl IntoIterator<Item = &'a Slice>,
    node: &NodeInfo,
) -> Result<Option<Proxied<'s, 'a>>, Rejection> {
    check_len(
        "namespace",
        svc.metadata.namespace.as_deref().unwrap_or(""),
        NAME_MAX,
    )?;
    check_len("name", svc.metadata.name.as_deref().unwrap_or(""), NAME_MAX)?;
    if has_label(&svc.metadata, SERVICE_PROXY_NAME_LABEL) {
        return Ok(None);
    }
    let Some(spec) = &svc.spec else {
        return Ok(None);
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(None);
    }
    let Some(cluster) = cluster_ips(
        spec.cluster_ips.as_deref().unwrap_or_default(),
        spec.cluster_ip.as_deref(),
    )?
    else {
        return Ok(None); // headless
    };
    let mut refused = Vec::new();
    let mut external_ips: Vec<IpAddr> = Vec::new();
    for raw in spec.external_ips.iter().flatten() {
        let ip = parse_ip("external IP", raw)?;
        match refuse_external_ip(&ip, node) {
            Some(why) => refused.push(format!("external IP {ip} is not honoured: {why}")),
            None if !external_ips.contains(&ip) => external_ips.push(ip),
            None => {}
        }
    }
    let mut notes = Vec::new();
    let ports = service_ports(spec.ports.as_deref().unwrap_or_default(), &mut notes)?;
    let (internal, external) = traffic_policies(spec)?;
    let affinity_timeout_s = affinity_timeout(spec)?;
    let lb_ips = load_balancer_ips(svc, &mut notes);
    let source_ranges = source_ranges(spec, &mut notes);
    let mut proxied = Proxied {
        spec,
        age: Age::of(&svc.metadata),
        cluster,
        external_ips,
        lb_ips,
        ports,
        internal,
        external,
        affinity_timeout_s,
        source_ranges,
        node_ports: matches!(spec.type_.as_deref(), Some("NodePort" | "LoadBalancer")),
        slices: Vec::new(),
        notes,
        refused,
    };
    if !proxied.serves() {
        return Ok(Some(proxied));
    }
    let notes = &mut proxied.notes;
    if (internal == TrafficPolicy::Local || external == TrafficPolicy::Local) && node.name.is_none()
    {
        notes.push(
            "a Local traffic policy needs the agent's --node-name; no endpoint is local".into(),
        );
    }
    for ip in proxied.external_ips.iter().chain(&proxied.lb_ips) {
        if !proxied.cluster.iter().any(|c| c.is_ipv6() == ip.is_ipv6()) {
            notes.push(format!(
                "{ip} is not served: the service has no cluster IP of its family"
            ));
        }
    }
    proxied.slices = slices.into_iter().filter(|s| s.ipv6.is_some()).collect();
    for s in &proxied.slices {
        notes.extend(s.notes.iter().cloned());
    }
    Ok(Some(proxied))
}
