//! [`Slice`]: an EndpointSlice reduced to what the model reads, and the merge of a service
//! port's endpoints across its slices.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{endpoints::Candidate, validate::Port};
use crate::k8s::object::{HEADLESS_LABEL, ObjectRef, SERVICE_PROXY_NAME_LABEL, has_label};

/// An EndpointSlice reduced to what the model reads, owned. The store keeps this instead of
/// the object, which is several times larger (every endpoint's target reference, the
/// managed fields...), and changes to parts nobody reads do not dirty the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    /// The service it belongs to (its `kubernetes.io/service-name` label).
    pub owner: Option<ObjectRef>,
    /// `Some(ipv6)` for a slice a proxy balances; `None` for other address types (FQDN) and
    /// for slices of headless services or of another proxy.
    pub(super) ipv6: Option<bool>,
    /// (name, protocol, port) of each valid slice port.
    pub(super) ports: Vec<(String, String, u16)>,
    /// Its endpoints, with port 0 until matched to a service port.
    pub(super) endpoints: Vec<Candidate>,
    /// What was skipped as invalid.
    pub(super) notes: Vec<String>,
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

pub(super) fn parse_slice(slice: &EndpointSlice, notes: &mut Vec<String>) -> Option<Parsed> {
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
pub(super) fn rank(c: &Candidate) -> u8 {
    match (c.ready, c.serving && c.terminating) {
        (true, _) => 0,
        (false, true) => 1,
        (false, false) => 2,
    }
}

/// The endpoints of one family and service port across all slices, deduplicated.
pub(super) fn candidates_for(ipv6: bool, port: &Port<'_>, slices: &[&Slice]) -> Vec<Candidate> {
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
