//! `lbctl external`: the north-south frontends, their policy, backends and counters.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    ServiceInfo,
    external::{EXTERNAL_F_LOCAL, EXTERNAL_F_SOURCE_RANGES, ExternalCounters},
};
use serde::{Deserialize, Serialize};

use super::table::table;
use crate::{addr::frontend_string, datapath::Contents};

/// One north-south frontend, as `lbctl external` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalRow {
    /// `address:port/PROTO` (a node address and node port, a load-balancer IP or an
    /// external IP, with the service port).
    pub frontend: String,
    /// North-south service id (shared by the frontends of one service port and family).
    pub id: u32,
    /// `namespace/name` of the Kubernetes service.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// `Cluster` or `Local` (externalTrafficPolicy).
    pub policy: String,
    /// Whether loadBalancerSourceRanges filter this frontend.
    pub source_ranges: bool,
    /// Distinct backends in the lookup table (0: new flows are dropped).
    pub backends: usize,
    /// Packets, bytes, new flows and drops of the service, summed over CPUs.
    pub counters: Counters,
}

/// A north-south service's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets translated (both directions).
    pub packets: u64,
    /// Their bytes (IP header on).
    pub bytes: u64,
    /// New flows.
    pub flows: u64,
    /// Packets dropped (no backend, source range, no SNAT port).
    pub drops: u64,
}

impl From<ExternalCounters> for Counters {
    fn from(c: ExternalCounters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            flows: c.flows,
            drops: c.drops,
        }
    }
}

/// The external traffic policy a north-south service's flags say: `Local` or `Cluster`.
pub(super) fn policy_name(flags: u16) -> &'static str {
    if flags & EXTERNAL_F_LOCAL != 0 {
        "Local"
    } else {
        "Cluster"
    }
}

pub(super) fn info_text(info: Option<&ServiceInfo>) -> (String, String) {
    let text = |f: fn(&ServiceInfo) -> Option<&str>| info.and_then(f).unwrap_or("?").to_owned();
    (
        format!(
            "{}/{}",
            text(ServiceInfo::namespace),
            text(ServiceInfo::name)
        ),
        text(ServiceInfo::port_name),
    )
}

pub(super) fn distinct_backends(table: Option<&[u32]>) -> usize {
    table.map_or(0, |t| {
        t.iter()
            .filter(|id| **id != 0)
            .collect::<BTreeSet<_>>()
            .len()
    })
}

/// Every north-south frontend, by service then frontend; `counters` by service id.
pub fn external(c: &Contents, counters: &BTreeMap<u32, ExternalCounters>) -> Vec<ExternalRow> {
    let mut rows: Vec<ExternalRow> = c
        .external
        .iter()
        .map(|(key, v)| {
            let (service, port_name) = info_text(c.external_info.get(&v.id));
            ExternalRow {
                frontend: frontend_string(key),
                id: v.id,
                service,
                port_name,
                policy: policy_name(v.flags).into(),
                source_ranges: v.flags & EXTERNAL_F_SOURCE_RANGES != 0,
                backends: distinct_backends(c.table_of(v)),
                counters: counters
                    .get(&v.id)
                    .copied()
                    .map(Counters::from)
                    .unwrap_or_default(),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    rows
}

/// `lbctl external` as a table.
pub fn external_table(rows: &[ExternalRow]) -> String {
    table(
        &[
            "FRONTEND", "SERVICE", "PORT", "POLICY", "RANGES", "BACKENDS", "PACKETS", "BYTES",
            "FLOWS", "DROPS", "ID",
        ],
        rows.iter().map(|r| {
            vec![
                r.frontend.clone(),
                r.service.clone(),
                r.port_name.clone(),
                r.policy.clone(),
                if r.source_ranges { "yes" } else { "-" }.into(),
                r.backends.to_string(),
                r.counters.packets.to_string(),
                r.counters.bytes.to_string(),
                r.counters.flows.to_string(),
                r.counters.drops.to_string(),
                r.id.to_string(),
            ]
        }),
    )
}
