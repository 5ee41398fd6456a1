//! `lbctl capacity`: how full each map is, and each namespace's share.

use serde::{Deserialize, Serialize};

use super::table::table;
use crate::datapath::{Capacities, Contents};

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityRow {
    /// The map's name.
    pub map: String,
    /// The agent flag that sets its capacity.
    pub flag: String,
    /// Entries in it now.
    pub entries: u64,
    /// Its capacity.
    pub capacity: u64,
    /// The capacity the current state needs: its entries, and for the slot map and the
    /// table array room to write the largest table beside the one it replaces (a change
    /// switches to a whole new table; without that room the change is refused).
    pub needed: u64,
    /// `entries` as a share of `capacity`, in percent.
    pub fill_percent: f64,
    /// What happens when it is full.
    pub when_full: String,
}

pub(super) fn fill(
    map: &str,
    flag: &str,
    (entries, needed): (u64, u64),
    capacity: u64,
    when_full: &str,
) -> CapacityRow {
    CapacityRow {
        map: map.to_owned(),
        flag: flag.to_owned(),
        entries,
        capacity,
        needed,
        fill_percent: if capacity == 0 {
            0.0
        } else {
            (entries as f64 * 1000.0 / capacity as f64).round() / 10.0
        },
        when_full: when_full.to_owned(),
    }
}

/// The fill of every map with a capacity: those the agent writes (from `c` and `caps`; the
/// Maglev array counts the table entries in use) and the LRU maps the programs write
/// (`lru`: name, entries, capacity).
pub fn capacity(
    c: &Contents,
    caps: &Capacities,
    lru: &[(&'static str, u64, u64)],
) -> Vec<CapacityRow> {
    use lb_common::maps;
    const REFUSED: &str = "new services refused, the rest kept";
    let n = |x: usize| x as u64;
    let table_entries: u64 = c.tables.values().map(|t| t.len() as u64).sum();
    let largest_slots = c.services.values().map(|v| u64::from(v.count)).max();
    let largest_table = c.tables.values().map(|t| t.len() as u64).max();
    // The maps the agent writes: a change that does not fit is refused.
    let written: [(&str, &str, u64, u64); 9] = [
        (
            maps::SERVICES,
            "--max-services",
            n(c.services.len()),
            caps.services.into(),
        ),
        (
            maps::SLOTS,
            "--max-slots",
            n(c.slots.len()),
            caps.slots.into(),
        ),
        (
            maps::BACKENDS,
            "--max-backends",
            n(c.backends.len()),
            caps.backends.into(),
        ),
        (
            maps::AFFINITY_MATCH,
            "--max-slots",
            n(c.affinity_match.len()),
            caps.affinity_match.into(),
        ),
        (
            maps::NS_SERVICES,
            "--max-external-frontends",
            n(c.external.len()),
            caps.external.into(),
        ),
        (
            maps::NS_INFO,
            "--max-external-services",
            n(c.external_info.len()),
            caps.external_ids.into(),
        ),
        (
            maps::RINGS,
            "--maglev-table-entries",
            table_entries,
            caps.table_entries.into(),
        ),
        (
            maps::SOURCE_RANGES,
            "--max-source-ranges",
            n(c.ranges.len()),
            caps.ranges.into(),
        ),
        (
            maps::NS_AFFINITY_MATCH,
            "--max-slots",
            n(c.external_match.len()),
            caps.external_match.into(),
        ),
    ];
    let mut rows: Vec<CapacityRow> = written
        .into_iter()
        .map(|(map, flag, entries, cap)| {
            let room = match map {
                maps::SLOTS => largest_slots,
                maps::RINGS => largest_table,
                _ => None,
            };
            let needed = entries + room.unwrap_or(0);
            fill(map, flag, (entries, needed), cap, REFUSED)
        })
        .collect();
    for (name, entries, cap) in lru {
        if *name == maps::UDP_SOCKETS {
            rows.push(fill(
                name,
                "--max-rev-nat",
                (*entries, *entries),
                *cap,
                "new connected UDP sockets are found through the reverse-NAT map only (counted)",
            ));
            continue;
        }
        let flag = match *name {
            maps::REV_NAT => "--max-rev-nat",
            maps::AFFINITY | maps::NS_AFFINITY => "--max-affinity",
            maps::CT_NEW | maps::NAT_REV_NEW => "--max-new-flows",
            _ => "--max-flows",
        };
        rows.push(fill(
            name,
            flag,
            (*entries, *entries),
            *cap,
            "the least recently used are evicted",
        ));
    }
    rows
}

/// The capacity view as a table.
pub fn capacity_table(rows: &[CapacityRow]) -> String {
    table(
        &[
            "MAP",
            "ENTRIES",
            "CAPACITY",
            "FILL",
            "NEEDS",
            "FLAG",
            "WHEN FULL",
        ],
        rows.iter().map(|r| {
            vec![
                r.map.clone(),
                r.entries.to_string(),
                r.capacity.to_string(),
                format!("{:.1}%", r.fill_percent),
                r.needed.to_string(),
                r.flag.clone(),
                r.when_full.clone(),
            ]
        }),
    )
}

/// `lbctl capacity --namespaces` as a table.
pub fn shares_table(rows: &[crate::model::share::Row]) -> String {
    table(
        &["NAMESPACE", "MAP", "USED", "SHARE", "FILL", "WAITING"],
        rows.iter().map(|r| {
            vec![
                r.namespace.clone(),
                r.map.clone(),
                r.used.to_string(),
                r.share.to_string(),
                format!("{:.1}%", r.used as f64 * 100.0 / r.share.max(1) as f64),
                r.waiting.to_string(),
            ]
        }),
    )
}
