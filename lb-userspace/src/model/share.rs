//! Per-namespace shares of the maps services fill.
//!
//! Every namespace's services share the datapath's maps. Without a bound, one tenant could
//! fill a map for everyone: a Service with many ports and external IPs, or selector-less
//! Services with hand-written EndpointSlices. Then other namespaces' new services get "map
//! full". So each namespace may hold at most a share of each map: `--namespace-share`, a
//! percentage of the map's capacity.
//!
//! A service is charged what its desired state would take: frontends, slots, distinct
//! backends, affinity-match entries, north-south services, ids, table entries and source
//! ranges. A change that makes a service *grow* past its namespace's share in some map is
//! refused, and the service keeps what it had, as for an invalid service. A change that
//! shrinks it is always taken. A refused service is tried again as soon as its namespace
//! frees room. Backends are counted per service, so pods that two services of one namespace
//! select count twice. This errs on the safe side.
//!
//! The maps the kernel fills per flow (conntrack, reverse NAT, affinity) are not charged
//! here. They are bounded per client by the new-flow tier and by LRU eviction.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lb_common::maps;
use serde::Serialize;

use crate::{
    datapath::Capacities,
    k8s::ObjectRef,
    model::{DesiredFrontend, ExternalGroup, Limits},
};

/// The maps a namespace's share applies to, in [`Usage`]'s order.
pub const MAPS: [&str; 8] = [
    maps::SERVICES,
    maps::SLOTS,
    maps::BACKENDS,
    maps::AFFINITY_MATCH,
    maps::EXTERNAL_SERVICES,
    maps::EXTERNAL_INFO,
    maps::TABLES,
    maps::SOURCE_RANGES,
];

/// Entries in each of [`MAPS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage(pub [u64; MAPS.len()]);

impl Usage {
    /// What a service with these frontends and north-south groups takes from the maps.
    pub fn of(frontends: &[DesiredFrontend], groups: &[ExternalGroup], limits: &Limits) -> Self {
        let mut backends = BTreeSet::new();
        let mut u = [0u64; MAPS.len()];
        for f in frontends {
            let n = f.backends.len() as u64;
            u[0] += 1;
            u[1] += n;
            if f.affinity_timeout_s > 0 {
                u[3] += n;
            }
            backends.extend(f.backends.iter().copied());
        }
        for g in groups {
            u[4] += g.frontends.len() as u64;
            u[5] += 1;
            if !g.backends.is_empty() {
                u[6] += u64::from(limits.table_size(g.backends.len()));
            }
            u[7] += g.source_ranges.as_ref().map_or(0, |r| r.len() as u64);
            backends.extend(g.backends.iter().copied());
        }
        u[2] = backends.len() as u64;
        Self(u)
    }

    fn add(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    fn sub(&mut self, other: &Self) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_sub(b);
        }
    }

    fn is_zero(&self) -> bool {
        self.0.iter().all(|n| *n == 0)
    }
}

/// A change refused because its namespace would hold more than its share of a map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exceeded {
    /// The map.
    pub map: &'static str,
    /// What the namespace would hold in it.
    pub used: u64,
    /// Its share.
    pub share: u64,
}

/// One namespace's use of one map, for `lbctl capacity`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Row {
    /// The namespace.
    pub namespace: String,
    /// The map.
    pub map: String,
    /// Entries its services are charged.
    pub used: u64,
    /// Its share of the map.
    pub share: u64,
    /// Services refused for the share, waiting for room.
    pub waiting: usize,
}

/// What each namespace's services are charged, against its share.
#[derive(Debug)]
pub struct Shares {
    /// Each map's share, in entries.
    share: Usage,
    /// Whether shares are checked (below 100%; at 100% a full map is reported as such).
    enforced: bool,
    charged: HashMap<ObjectRef, Usage>,
    used: BTreeMap<String, Usage>,
    /// Services refused for their namespace's share.
    waiting: BTreeSet<ObjectRef>,
    /// Namespaces whose use went down since [`Self::take_retries`].
    freed: BTreeSet<String>,
}

impl Shares {
    /// Shares of `percent` (1-100) of each map's capacity, at least one entry each; 100
    /// only counts.
    pub fn new(caps: &Capacities, percent: u32) -> Self {
        let capacity = [
            caps.services,
            caps.slots,
            caps.backends,
            caps.affinity_match,
            caps.external,
            caps.external_ids,
            caps.table_entries,
            caps.ranges,
        ];
        let percent = u64::from(percent.clamp(1, 100));
        Self {
            share: Usage(capacity.map(|c| (u64::from(c) * percent / 100).max(1))),
            enforced: percent < 100,
            charged: HashMap::new(),
            used: BTreeMap::new(),
            waiting: BTreeSet::new(),
            freed: BTreeSet::new(),
        }
    }

    /// Charges `owner` for `want` if its namespace stays within its share in every map it
    /// grows in; else it keeps what it was charged, waits for room, and the first map over
    /// is returned.
    pub fn admit(&mut self, owner: &ObjectRef, want: Usage) -> Result<(), Exceeded> {
        let had = self.charged.get(owner).copied().unwrap_or_default();
        let used = self.used.get(&owner.namespace).copied().unwrap_or_default();
        for (i, map) in MAPS.iter().enumerate() {
            let after = used.0[i] - had.0[i].min(used.0[i]) + want.0[i];
            if self.enforced && want.0[i] > had.0[i] && after > self.share.0[i] {
                self.waiting.insert(owner.clone());
                return Err(Exceeded {
                    map,
                    used: after,
                    share: self.share.0[i],
                });
            }
        }
        self.waiting.remove(owner);
        self.charge(owner, want);
        Ok(())
    }

    /// Charges `owner` for what it holds without checking its share (a service an earlier
    /// run programmed, kept while it is rejected).
    pub fn hold(&mut self, owner: &ObjectRef, held: Usage) {
        self.charge(owner, held);
    }

    /// Forgets `owner` (deleted): its namespace gets its room back.
    pub fn release(&mut self, owner: &ObjectRef) {
        self.waiting.remove(owner);
        self.charge(owner, Usage::default());
    }

    fn charge(&mut self, owner: &ObjectRef, want: Usage) {
        let had = match want.is_zero() {
            true => self.charged.remove(owner),
            false => self.charged.insert(owner.clone(), want),
        }
        .unwrap_or_default();
        if had == want {
            return;
        }
        let used = self.used.entry(owner.namespace.clone()).or_default();
        used.sub(&had);
        used.add(&want);
        if used.is_zero() {
            self.used.remove(&owner.namespace);
        }
        if had.0.iter().zip(want.0).any(|(h, w)| *h > w) {
            self.freed.insert(owner.namespace.clone());
        }
    }

    /// The waiting services of namespaces that freed room since the last call: to be
    /// planned again.
    pub fn take_retries(&mut self) -> BTreeSet<ObjectRef> {
        let freed = std::mem::take(&mut self.freed);
        self.waiting
            .iter()
            .filter(|o| freed.contains(&o.namespace))
            .cloned()
            .collect()
    }

    /// Each namespace's use of each map it holds entries in, fullest first.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .used
            .iter()
            .flat_map(|(ns, used)| {
                let waiting = self.waiting.iter().filter(|o| &o.namespace == ns).count();
                MAPS.iter()
                    .zip(used.0.iter().zip(self.share.0))
                    .filter(|(_, (u, _))| **u > 0)
                    .map(move |(map, (u, share))| Row {
                        namespace: ns.clone(),
                        map: (*map).to_owned(),
                        used: *u,
                        share,
                        waiting,
                    })
            })
            .collect();
        rows.sort_by(|a, b| {
            (b.used * a.share)
                .cmp(&(a.used * b.share))
                .then_with(|| (&a.namespace, &a.map).cmp(&(&b.namespace, &b.map)))
        });
        rows
    }

    /// Services refused for their namespace's share.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps() -> Capacities {
        Capacities {
            services: 10,
            slots: 100,
            backends: 100,
            affinity_match: 100,
            external: 10,
            external_ids: 10,
            table_entries: 1000,
            ranges: 10,
            external_match: 100,
        }
    }

    fn services(n: u64) -> Usage {
        let mut u = Usage::default();
        u.0[0] = n;
        u
    }

    #[test]
    fn a_namespace_over_its_share_is_refused_and_others_are_not() {
        let mut s = Shares::new(&caps(), 50);
        let a = |i| ObjectRef::new("greedy", format!("s{i}"));
        for i in 0..5 {
            s.admit(&a(i), services(1)).unwrap();
        }
        let err = s.admit(&a(5), services(1)).unwrap_err();
        assert_eq!(
            err,
            Exceeded {
                map: maps::SERVICES,
                used: 6,
                share: 5
            }
        );
        s.admit(&ObjectRef::new("other", "x"), services(5))
            .expect("another namespace has its own share");
        assert_eq!(s.waiting(), 1);
    }

    #[test]
    fn shrinking_is_always_taken_and_frees_room_for_the_waiting() {
        let mut s = Shares::new(&caps(), 50);
        let (big, late) = (ObjectRef::new("t", "big"), ObjectRef::new("t", "late"));
        s.admit(&big, services(5)).unwrap();
        assert!(s.admit(&late, services(1)).is_err());
        assert!(s.take_retries().is_empty(), "nothing freed yet");
        // Over the share (a lowered flag after a restart) but shrinking: taken.
        s.hold(&big, services(7));
        s.admit(&big, services(4)).unwrap();
        assert_eq!(s.take_retries(), BTreeSet::from([late.clone()]));
        s.admit(&late, services(1)).unwrap();
        assert_eq!(s.waiting(), 0);
        s.release(&big);
        s.release(&late);
        assert!(
            s.rows().is_empty(),
            "a namespace without services holds nothing"
        );
    }

    #[test]
    fn rows_put_the_fullest_first() {
        let mut s = Shares::new(&caps(), 100);
        s.admit(&ObjectRef::new("a", "x"), services(2)).unwrap();
        let mut u = services(1);
        u.0[1] = 90;
        s.admit(&ObjectRef::new("b", "y"), u).unwrap();
        let rows = s.rows();
        let got: Vec<(&str, &str, u64)> = rows
            .iter()
            .map(|r| (r.namespace.as_str(), r.map.as_str(), r.used))
            .collect();
        assert_eq!(
            got,
            [
                ("b", maps::SLOTS, 90),
                ("a", maps::SERVICES, 2),
                ("b", maps::SERVICES, 1)
            ]
        );
    }
}
