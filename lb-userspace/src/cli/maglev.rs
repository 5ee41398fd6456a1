//! `lbctl maglev`: each backend's share of a north-south service's lookup table.

use std::{collections::BTreeMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

use super::{
    external::info_text,
    services::{ServiceRow, selects},
    table::table,
};
use crate::{
    addr::{frontend_string, to_socket_addr},
    datapath::Contents,
};

/// One backend's part of a Maglev table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Share {
    /// Backend id.
    pub backend_id: u32,
    /// Its address, or `None` if the backend is missing (an inconsistency).
    pub backend: Option<SocketAddr>,
    /// Table entries naming it.
    pub entries: u32,
    /// The share of new flows it gets, in percent.
    pub percent: f64,
}

/// A north-south service's Maglev table, summarised, as `lbctl maglev` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaglevSummary {
    /// North-south service id.
    pub id: u32,
    /// `namespace/name`.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// Its frontends.
    pub frontends: Vec<String>,
    /// First entry of its table in the table array.
    pub offset: u32,
    /// Table size (a prime; 0 when it has no backend).
    pub size: u32,
    /// Backends by id, with their shares.
    pub shares: Vec<Share>,
}

/// How many entries of a north-south frontend's table name each backend id.
pub(super) fn table_counts(
    c: &Contents,
    v: &lb_common::external::ExternalService,
) -> BTreeMap<u32, u32> {
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    for id in c.table_of(v).into_iter().flatten() {
        *counts.entry(*id).or_default() += 1;
    }
    counts
}

/// The Maglev tables of the north-south services `selector` picks (`namespace/name` or a
/// frontend, as for `lbctl service`; empty: all).
pub fn maglev(c: &Contents, selector: &str) -> Vec<MaglevSummary> {
    let mut by_id: BTreeMap<u32, MaglevSummary> = BTreeMap::new();
    for (key, v) in &c.external {
        let (service, port_name) = info_text(c.external_info.get(&v.id));
        let row = ServiceRow {
            frontend: frontend_string(key),
            id: v.id,
            backends: 0,
            service: service.clone(),
            port_name: port_name.clone(),
        };
        if !selector.is_empty() && !selects(selector, key, &row) {
            // Another frontend of the same service may still select it.
            continue;
        }
        let summary = by_id.entry(v.id).or_insert_with(|| {
            let counts = table_counts(c, v);
            let size = v.table_size;
            MaglevSummary {
                id: v.id,
                service,
                port_name,
                frontends: Vec::new(),
                offset: v.table_off,
                size,
                shares: counts
                    .into_iter()
                    .map(|(id, entries)| Share {
                        backend_id: id,
                        backend: c.backends.get(&id).map(to_socket_addr),
                        entries,
                        percent: f64::from(entries) * 100.0 / f64::from(size.max(1)),
                    })
                    .collect(),
            }
        });
        summary.frontends.push(frontend_string(key));
    }
    by_id.into_values().collect()
}

/// `lbctl maglev` as text.
pub fn maglev_text(summaries: &[MaglevSummary]) -> String {
    summaries
        .iter()
        .map(|m| {
            let shares = table(
                &["BACKEND-ID", "BACKEND", "ENTRIES", "SHARE"],
                m.shares.iter().map(|s| {
                    vec![
                        s.backend_id.to_string(),
                        s.backend.map_or("MISSING".into(), |b| b.to_string()),
                        s.entries.to_string(),
                        format!("{:.2}%", s.percent),
                    ]
                }),
            );
            format!(
                "{} (port {:?}), id {}, table of {} at {}, frontends {}\n{}",
                m.service,
                m.port_name,
                m.id,
                m.size,
                m.offset,
                m.frontends.join(" "),
                shares
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}
