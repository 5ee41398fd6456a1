//! `lbctl capacity`: how full each map is, and each namespace's share.

use serde::{Deserialize, Serialize};

use super::table::table;
use crate::datapath::{Capacities, Contents, catalogue};

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
/// Maglev array counts the table entries in use) and those the programs write (`lru`: name,
/// entries, capacity). Each row names the flag that sizes the map and what a full map means,
/// from the [catalogue](crate::datapath::catalogue).
pub fn capacity(
    c: &Contents,
    caps: &Capacities,
    lru: &[(&'static str, u64, u64)],
) -> Vec<CapacityRow> {
    use lb_common::maps;
    let n = |x: usize| x as u64;
    let largest_slots = c.services.values().map(|v| u64::from(v.count)).max();
    let largest_table = c.tables.values().map(|t| t.len() as u64).max();
    // The maps the agent writes: (map, entries, capacity).
    let written: [(&str, u64, u32); 9] = [
        (maps::SERVICES, n(c.services.len()), caps.services),
        (maps::SLOTS, n(c.slots.len()), caps.slots),
        (maps::BACKENDS, n(c.backends.len()), caps.backends),
        (
            maps::AFFINITY_MATCH,
            n(c.affinity_match.len()),
            caps.affinity_match,
        ),
        (maps::EXTERNAL_SERVICES, n(c.external.len()), caps.external),
        (
            maps::EXTERNAL_INFO,
            n(c.external_info.len()),
            caps.external_ids,
        ),
        (
            maps::TABLES,
            c.tables.values().map(|t| t.len() as u64).sum(),
            caps.table_entries,
        ),
        (maps::SOURCE_RANGES, n(c.ranges.len()), caps.ranges),
        (
            maps::EXTERNAL_AFFINITY_MATCH,
            n(c.external_match.len()),
            caps.external_match,
        ),
    ];
    let room = |map: &str| match map {
        maps::SLOTS => largest_slots,
        maps::TABLES => largest_table,
        _ => None,
    };
    written
        .into_iter()
        .map(|(map, entries, cap)| {
            (
                map,
                entries,
                entries + room(map).unwrap_or(0),
                u64::from(cap),
            )
        })
        .chain(
            lru.iter()
                .map(|(map, entries, cap)| (*map, *entries, *entries, *cap)),
        )
        .map(|(map, entries, needed, cap)| {
            let e = catalogue::entry_of(map);
            let flag = e.map_or("", |e| e.knob.flag());
            let when_full = e.map_or("", |e| e.when_full.text());
            fill(map, flag, (entries, needed), cap, when_full)
        })
        .collect()
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
