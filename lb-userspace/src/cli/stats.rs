//! `lbctl stats`: the datapath counters, in all and per frontend and backend.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{external::ExternalCounters, stats};
use serde::{Deserialize, Serialize};

use super::{external::info_text, services::row, table::table};
use crate::{
    addr::{frontend_string, to_socket_addr},
    datapath::Contents,
};

/// Datapath counters by name.
pub fn stats(totals: &[u64]) -> BTreeMap<&'static str, u64> {
    stats::NAMES
        .iter()
        .copied()
        .zip(totals.iter().copied())
        .collect()
}

/// `lbctl stats` as a table.
pub fn stats_table(stats: &BTreeMap<&'static str, u64>) -> String {
    table(
        &["COUNTER", "VALUE"],
        stats
            .iter()
            .map(|(k, v)| vec![k.to_string(), v.to_string()]),
    )
}

/// One frontend's traffic, as `lbctl stats --services` lists it (an `ipvsadm --stats` view).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatsRow {
    /// `address:port/PROTO`.
    pub frontend: String,
    /// `socket` (connections from this node's processes) or `north-south` (packets from
    /// outside, in XDP).
    pub path: String,
    /// `namespace/name`.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// New connections (socket: connects and unconnected datagrams translated; north-south:
    /// new flows).
    pub connections: u64,
    /// Refused (socket: no backend) or dropped (north-south: no backend, source range, no
    /// SNAT port).
    pub rejected: u64,
    /// Packets translated (north-south only: the socket hooks see no packets).
    pub packets: Option<u64>,
    /// Their bytes (north-south only).
    pub bytes: Option<u64>,
}

/// One backend's new connections from the socket hooks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatsRow {
    /// Backend id.
    pub id: u32,
    /// Address and port.
    pub address: SocketAddr,
    /// Connections and unconnected datagrams translated to it.
    pub connections: u64,
}

/// Every frontend's counters: socket ones by service id (`socket`), north-south ones by
/// north-south service id (`north_south`; shared by the frontends of one service port).
pub fn service_stats(
    c: &Contents,
    socket: &BTreeMap<u32, lb_common::stats::SocketCounters>,
    north_south: &BTreeMap<u32, ExternalCounters>,
) -> Vec<ServiceStatsRow> {
    let mut rows: Vec<ServiceStatsRow> = c
        .services
        .iter()
        .map(|(key, v)| {
            let r = row(c, key);
            let n = socket.get(&v.id).copied().unwrap_or_default();
            ServiceStatsRow {
                frontend: r.frontend,
                path: "socket".into(),
                service: r.service,
                port_name: r.port_name,
                connections: n.translated,
                rejected: n.refused,
                packets: None,
                bytes: None,
            }
        })
        .collect();
    rows.extend(c.external.iter().map(|(key, v)| {
        let (service, port_name) = info_text(c.external_info.get(&v.id));
        let n = north_south.get(&v.id).copied().unwrap_or_default();
        ServiceStatsRow {
            frontend: frontend_string(key),
            path: "north-south".into(),
            service,
            port_name,
            connections: n.flows,
            rejected: n.drops,
            packets: Some(n.packets),
            bytes: Some(n.bytes),
        }
    }));
    rows.sort_by(|a, b| {
        (&a.service, &a.path, &a.frontend).cmp(&(&b.service, &b.path, &b.frontend))
    });
    rows
}

/// Every backend's connection count (`counts` by backend id).
pub fn backend_stats(c: &Contents, counts: &BTreeMap<u32, u64>) -> Vec<BackendStatsRow> {
    c.backends
        .iter()
        .map(|(id, ep)| BackendStatsRow {
            id: *id,
            address: to_socket_addr(ep),
            connections: counts.get(id).copied().unwrap_or_default(),
        })
        .collect()
}

/// The per-service counters as a table.
pub fn service_stats_table(rows: &[ServiceStatsRow]) -> String {
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    table(
        &[
            "FRONTEND",
            "PATH",
            "SERVICE",
            "PORT",
            "CONNECTIONS",
            "REJECTED",
            "PACKETS",
            "BYTES",
        ],
        rows.iter().map(|r| {
            vec![
                r.frontend.clone(),
                r.path.clone(),
                r.service.clone(),
                r.port_name.clone(),
                r.connections.to_string(),
                r.rejected.to_string(),
                opt(r.packets),
                opt(r.bytes),
            ]
        }),
    )
}

/// The per-backend counters as a table.
pub fn backend_stats_table(rows: &[BackendStatsRow]) -> String {
    table(
        &["BACKEND", "ID", "CONNECTIONS"],
        rows.iter().map(|r| {
            vec![
                r.address.to_string(),
                r.id.to_string(),
                r.connections.to_string(),
            ]
        }),
    )
}
