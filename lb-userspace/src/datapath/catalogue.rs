//! The map catalogue: for every map with a capacity, the agent flag that sets it, how its
//! size follows from that flag, and what happens when it is full. The loader sizes the maps
//! from it, `lbctl capacity` names the flags and the consequences from it, and the agent's
//! flag checks read it. It is the only place that says which flag sizes which map.

use lb_common::maps;

use crate::loader::MapSizes;

/// A capacity flag of the agent, which sizes one or more maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knob {
    /// `--max-services`.
    Services,
    /// `--max-slots`.
    Slots,
    /// `--max-backends`.
    Backends,
    /// `--max-rev-nat`.
    RevNat,
    /// `--max-affinity`.
    Affinity,
    /// `--max-external-frontends`.
    External,
    /// `--max-external-services`.
    ExternalIds,
    /// `--maglev-table-entries`.
    TableEntries,
    /// `--max-flows`.
    Flows,
    /// `--max-new-flows`.
    NewFlows,
    /// `--max-source-ranges`.
    SourceRanges,
}

impl Knob {
    /// Every capacity flag.
    pub const ALL: [Self; 11] = [
        Self::Services,
        Self::Slots,
        Self::Backends,
        Self::RevNat,
        Self::Affinity,
        Self::External,
        Self::ExternalIds,
        Self::TableEntries,
        Self::Flows,
        Self::NewFlows,
        Self::SourceRanges,
    ];

    /// The agent's flag.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Services => "--max-services",
            Self::Slots => "--max-slots",
            Self::Backends => "--max-backends",
            Self::RevNat => "--max-rev-nat",
            Self::Affinity => "--max-affinity",
            Self::External => "--max-external-frontends",
            Self::ExternalIds => "--max-external-services",
            Self::TableEntries => "--maglev-table-entries",
            Self::Flows => "--max-flows",
            Self::NewFlows => "--max-new-flows",
            Self::SourceRanges => "--max-source-ranges",
        }
    }

    /// Its value in `sizes`.
    pub fn value(self, sizes: &MapSizes) -> u32 {
        match self {
            Self::Services => sizes.services,
            Self::Slots => sizes.slots,
            Self::Backends => sizes.backends,
            Self::RevNat => sizes.rev_nat,
            Self::Affinity => sizes.affinity,
            Self::External => sizes.external,
            Self::ExternalIds => sizes.external_ids,
            Self::TableEntries => sizes.table_entries,
            Self::Flows => sizes.flows,
            Self::NewFlows => sizes.new_flows,
            Self::SourceRanges => sizes.source_ranges,
        }
    }
}

/// How a map's size follows from its flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// The flag's value.
    Same,
    /// One more: arrays indexed by ids that start at 1.
    PlusOne,
    /// The table array, whose elements hold [`maps::TABLE_LANES`] entries each.
    Lanes,
}

/// What a full map means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// The agent writes it: a change that does not fit is refused and the rest kept.
    Refused,
    /// The programs write it, least recently used first out.
    Evicted,
    /// The connected-UDP-socket map: a socket that finds it full is found through the
    /// reverse-NAT map only.
    RevNatOnly,
    /// Counters indexed by id: never full while the map they count for has room.
    Never,
}

impl WhenFull {
    /// The consequence, as `lbctl capacity` says it.
    pub fn text(self) -> &'static str {
        match self {
            Self::Refused => "new services refused, the rest kept",
            Self::Evicted => "the least recently used are evicted",
            Self::RevNatOnly => {
                "new connected UDP sockets are found through the reverse-NAT map only (counted)"
            }
            Self::Never => "sized with the map it counts for",
        }
    }
}

/// One map of the catalogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The map's name.
    pub map: &'static str,
    /// The flag that sizes it.
    pub knob: Knob,
    /// How.
    pub size: Size,
    /// What a full map means.
    pub when_full: WhenFull,
}

const fn entry(map: &'static str, knob: Knob, size: Size, when_full: WhenFull) -> Entry {
    Entry {
        map,
        knob,
        size,
        when_full,
    }
}

/// Every map with a capacity flag. The others are fixed by this build: the counters
/// ([`maps::STATS`], one element per counter), the scratch space, the XDP device set and
/// the debug ring.
pub const CATALOGUE: [Entry; 21] = {
    use Knob::{
        Affinity, Backends, External, ExternalIds, Flows, NewFlows, RevNat, Services, Slots,
        SourceRanges, TableEntries,
    };
    use Size::{Lanes, PlusOne, Same};
    use WhenFull::{Evicted, Never, Refused, RevNatOnly};
    [
        entry(maps::SERVICES, Services, Same, Refused),
        entry(maps::SERVICE_INFO, Services, Same, Refused),
        entry(maps::SVC_STATS, Services, PlusOne, Never),
        entry(maps::SLOTS, Slots, Same, Refused),
        // A service with affinity has one match entry per slot.
        entry(maps::AFFINITY_MATCH, Slots, Same, Refused),
        entry(maps::EXTERNAL_AFFINITY_MATCH, Slots, Same, Refused),
        entry(maps::BACKENDS, Backends, Same, Refused),
        entry(maps::BE_STATS, Backends, PlusOne, Never),
        entry(maps::REV_NAT, RevNat, Same, Evicted),
        entry(maps::UDP_SOCKETS, RevNat, Same, RevNatOnly),
        entry(maps::AFFINITY, Affinity, Same, Evicted),
        entry(maps::EXTERNAL_AFFINITY, Affinity, Same, Evicted),
        entry(maps::EXTERNAL_SERVICES, External, Same, Refused),
        entry(maps::EXTERNAL_INFO, ExternalIds, PlusOne, Refused),
        entry(maps::EXTERNAL_STATS, ExternalIds, PlusOne, Never),
        entry(maps::TABLES, TableEntries, Lanes, Refused),
        entry(maps::CONNTRACK, Flows, Same, Evicted),
        entry(maps::EXTERNAL_REV_NAT, Flows, Same, Evicted),
        entry(maps::CT_NEW, NewFlows, Same, Evicted),
        entry(maps::EXTERNAL_REV_NAT_NEW, NewFlows, Same, Evicted),
        entry(maps::SOURCE_RANGES, SourceRanges, Same, Refused),
    ]
};

/// The catalogue's entry of map `name`, if it has a capacity flag.
pub fn entry_of(name: &str) -> Option<&'static Entry> {
    CATALOGUE.iter().find(|e| e.map == name)
}

/// The capacity to create map `name` with, from `sizes`; `None` for a map of fixed size
/// that the build sets (the counters' array takes one element per counter).
pub fn size_of(name: &str, sizes: &MapSizes) -> Option<u32> {
    if name == maps::STATS {
        // A build with more counters makes the array anew (the counts start again).
        return Some(lb_common::stats::COUNT);
    }
    let e = entry_of(name)?;
    let v = e.knob.value(sizes);
    Some(match e.size {
        Size::Same => v,
        Size::PlusOne => v + 1,
        Size::Lanes => v.div_ceil(maps::TABLE_LANES),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flag_sizes_a_map_and_every_map_is_listed_once() {
        for knob in Knob::ALL {
            assert!(
                CATALOGUE.iter().any(|e| e.knob == knob),
                "{} sizes nothing",
                knob.flag()
            );
        }
        for (i, e) in CATALOGUE.iter().enumerate() {
            assert!(
                maps::ALL.iter().any(|s| s.name == e.map),
                "{} is a map",
                e.map
            );
            assert!(
                CATALOGUE[..i].iter().all(|o| o.map != e.map),
                "{} listed twice",
                e.map
            );
        }
    }

    #[test]
    fn sizes_follow_the_flags() {
        let sizes = MapSizes {
            services: 10,
            slots: 20,
            backends: 30,
            rev_nat: 40,
            affinity: 50,
            external: 60,
            external_ids: 70,
            table_entries: 8 * maps::TABLE_LANES + 1,
            flows: 90,
            new_flows: 100,
            source_ranges: 110,
        };
        assert_eq!(size_of(maps::SVC_STATS, &sizes), Some(11));
        assert_eq!(size_of(maps::UDP_SOCKETS, &sizes), Some(40));
        assert_eq!(size_of(maps::EXTERNAL_INFO, &sizes), Some(71));
        assert_eq!(size_of(maps::TABLES, &sizes), Some(9));
        assert_eq!(size_of(maps::CT_NEW, &sizes), Some(100));
        assert_eq!(size_of(maps::STATS, &sizes), Some(lb_common::stats::COUNT));
        assert_eq!(size_of(maps::SCRATCH, &sizes), None);
    }
}
