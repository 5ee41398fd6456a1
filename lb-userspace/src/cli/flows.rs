//! `lbctl conntrack`: the tracked north-south flows.

use std::net::SocketAddr;

use lb_common::external::{CT_STATE_NAMES, CtEntry, FlowKey};
use serde::{Deserialize, Serialize};

use super::{external::info_text, table::table};
use crate::{
    addr::{protocol_name, to_ip, to_socket_addr},
    datapath::Contents,
};

/// One tracked north-south flow, as `lbctl conntrack` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The client's address and port.
    pub client: SocketAddr,
    /// The frontend it reached.
    pub frontend: SocketAddr,
    /// The backend it goes to.
    pub backend: SocketAddr,
    /// The node address and port it is SNATed to, if any.
    pub snat: Option<SocketAddr>,
    /// `namespace/name` of the service.
    pub service: String,
    /// Its state (`syn`, `established`, `close_wait`, `closed`, `udp`, `udp_stream`), or
    /// `expired` (the programs ignore it; the next sweep removes it).
    pub state: String,
    /// Seconds since the flow started.
    pub age_s: u64,
    /// Seconds until it expires unless a packet comes (zero: expired).
    pub expires_in_s: u64,
}

/// Tracked flows at time `now` (the programs' conntrack clock,
/// [`crate::datapath::conntrack::clock_now`]), by service then client.
pub fn flows(c: &Contents, entries: &[(FlowKey, CtEntry)], now: u32) -> Vec<FlowRow> {
    let mut rows: Vec<FlowRow> = entries
        .iter()
        .map(|(k, e)| FlowRow {
            protocol: protocol_name(k.proto),
            client: SocketAddr::new(to_ip(k.saddr), u16::from_be(k.sport_be)),
            frontend: SocketAddr::new(to_ip(k.daddr), u16::from_be(k.dport_be)),
            backend: to_socket_addr(&e.backend),
            snat: e
                .is_snat()
                .then(|| SocketAddr::new(to_ip(e.snat_addr), u16::from_be(e.snat_port_be))),
            service: info_text(c.external_info.get(&e.svc_id)).0,
            state: if e.expired(now) {
                "expired".into()
            } else {
                CT_STATE_NAMES[e.state(k.proto)].into()
            },
            age_s: u64::from(now.saturating_sub(e.created)),
            expires_in_s: u64::from(e.expires.saturating_sub(now)),
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, a.client).cmp(&(&b.service, b.client)));
    rows
}

/// `lbctl conntrack` as a table.
pub fn flows_table(rows: &[FlowRow]) -> String {
    table(
        &[
            "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "SERVICE", "STATE", "AGE", "EXPIRES",
        ],
        rows.iter().map(|r| {
            vec![
                r.protocol.clone(),
                r.client.to_string(),
                r.frontend.to_string(),
                r.backend.to_string(),
                r.snat.map_or("-".into(), |b| b.to_string()),
                r.service.clone(),
                r.state.clone(),
                format!("{}s", r.age_s),
                format!("{}s", r.expires_in_s),
            ]
        }),
    )
}
