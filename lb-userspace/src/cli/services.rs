//! `lbctl services`, `lbctl service` and `lbctl backends`: the socket-level frontends, their
//! slots and backends.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::ServiceKey;
use serde::{Deserialize, Serialize};

use super::table::table;
use crate::{
    addr::{frontend_string, protocol_name, to_ip, to_socket_addr},
    datapath::Contents,
};

/// One frontend, as `lbctl services` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    /// `VIP:port/PROTO`.
    pub frontend: String,
    /// Service id in the maps.
    pub id: u32,
    /// Number of backends.
    pub backends: u16,
    /// `namespace/name` of the Kubernetes service.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
}

/// One slot of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRow {
    /// Slot number.
    pub slot: u32,
    /// Backend id.
    pub backend_id: u32,
    /// Backend address, or `None` if the backend is missing (an inconsistency).
    pub backend: Option<SocketAddr>,
}

/// One frontend with its slots, as `lbctl service` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDetail {
    /// The frontend.
    #[serde(flatten)]
    pub row: ServiceRow,
    /// Its slots in order.
    pub slots: Vec<SlotRow>,
}

/// One backend, as `lbctl backends` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    /// Backend id.
    pub id: u32,
    /// Address and port.
    pub address: SocketAddr,
    /// How many frontend slots name it.
    pub slots: usize,
}

pub(super) fn row(c: &Contents, key: &ServiceKey) -> ServiceRow {
    let value = c.services[key];
    let info = c.info.get(&value.id);
    let text =
        |f: fn(&lb_common::ServiceInfo) -> Option<&str>| info.and_then(f).unwrap_or("?").to_owned();
    ServiceRow {
        frontend: frontend_string(key),
        id: value.id,
        backends: value.count,
        service: format!(
            "{}/{}",
            text(lb_common::ServiceInfo::namespace),
            text(lb_common::ServiceInfo::name)
        ),
        port_name: text(lb_common::ServiceInfo::port_name),
    }
}

/// Every frontend, by service then frontend.
pub fn services(c: &Contents) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = c.services.keys().map(|k| row(c, k)).collect();
    rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    rows
}

/// Whether `selector` (`namespace/name`, `VIP:port` or `VIP:port/PROTO`) picks `key`.
pub(super) fn selects(selector: &str, key: &ServiceKey, row: &ServiceRow) -> bool {
    if selector == row.service {
        return true;
    }
    let addr = match selector.rsplit_once('/') {
        Some((addr, p)) if p.eq_ignore_ascii_case(&protocol_name(key.proto)) => addr,
        Some(_) => return false,
        None => selector,
    };
    addr.parse::<SocketAddr>().is_ok_and(|sa| {
        sa.ip().to_canonical() == to_ip(key.addr) && sa.port() == u16::from_be(key.port_be)
    })
}

/// The frontends `selector` picks, with their slots.
pub fn service_detail(c: &Contents, selector: &str) -> Vec<ServiceDetail> {
    let mut out: Vec<ServiceDetail> = c
        .services
        .iter()
        .filter_map(|(key, value)| {
            let row = row(c, key);
            selects(selector, key, &row).then(|| ServiceDetail {
                slots: c
                    .live_slots(value)
                    .map(|(k, id)| SlotRow {
                        slot: k.index(),
                        backend_id: *id,
                        backend: c.backends.get(id).map(to_socket_addr),
                    })
                    .collect(),
                row,
            })
        })
        .collect();
    out.sort_by(|a, b| a.row.frontend.cmp(&b.row.frontend));
    out
}

/// Every backend with the number of slots naming it.
pub fn backends(c: &Contents) -> Vec<BackendRow> {
    let mut refs: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, id) in c.services.values().flat_map(|v| c.live_slots(v)) {
        *refs.entry(*id).or_default() += 1;
    }
    c.backends
        .iter()
        .map(|(id, ep)| BackendRow {
            id: *id,
            address: to_socket_addr(ep),
            slots: refs.get(id).copied().unwrap_or(0),
        })
        .collect()
}

/// `lbctl services` as a table.
pub fn services_table(rows: &[ServiceRow]) -> String {
    table(
        &["FRONTEND", "BACKENDS", "SERVICE", "PORT", "ID"],
        rows.iter().map(|r| {
            vec![
                r.frontend.clone(),
                r.backends.to_string(),
                r.service.clone(),
                r.port_name.clone(),
                r.id.to_string(),
            ]
        }),
    )
}

/// `lbctl service` as text.
pub fn detail_text(details: &[ServiceDetail]) -> String {
    details
        .iter()
        .map(|d| {
            let r = &d.row;
            let slots = table(
                &["SLOT", "BACKEND-ID", "BACKEND"],
                d.slots.iter().map(|s| {
                    vec![
                        s.slot.to_string(),
                        s.backend_id.to_string(),
                        s.backend.map_or("MISSING".into(), |b| b.to_string()),
                    ]
                }),
            );
            format!(
                "{} -> {} (port {:?}), id {}, {} backends\n{}",
                r.frontend, r.service, r.port_name, r.id, r.backends, slots
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `lbctl backends` as a table.
pub fn backends_table(rows: &[BackendRow]) -> String {
    table(
        &["ID", "ADDRESS", "SLOTS"],
        rows.iter()
            .map(|r| vec![r.id.to_string(), r.address.to_string(), r.slots.to_string()]),
    )
}
