//! North-south frontends: from [`ExternalGroup`]s to ordered writes of the XDP maps.
//!
//! A group (one service port and address family) has an id (its info, counters, source
//! ranges and session affinity marks), a Maglev table in a region of the table array, and
//! frontends (node ports, load-balancer IPs, external IPs) whose entries name the id and the
//! region. A sync runs in three phases, so that every prefix of the writes leaves lookups
//! consistent:
//!
//! 1. per changed group: new backends, a new id (counters zeroed), a changed table written
//!    whole to a free region, its info, source ranges it gains, and its affinity marks (of
//!    backends it lost removed first, so affinity never leads to a backend leaving);
//! 2. per frontend whose claims or group changed: the entry, pointing at the group's id,
//!    region and flags (the one write that switches it to the new table); or its removal;
//! 3. what nothing names any more: source ranges the group lost, the info and affinity
//!    marks of groups that are gone.
//!
//! Old regions (zeroed), backends nothing names and the ids of groups that are gone are
//! freed only after a grace period ([`Reconciler::retire`]), so a packet that read an entry
//! just before it changed still finds the whole table it read, and never another service's.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use lb_common::{
    Backend, Endpoint, ServiceInfo, ServiceKey,
    external::{
        EXTERNAL_F_AFFINITY, EXTERNAL_F_LOCAL, EXTERNAL_F_SOURCE_RANGES, ExternalAffinityMatchKey,
        ExternalService, SOURCE_RANGE_ID_BITS, SourceRange,
    },
    maps,
};

use super::{
    Conflict, MapFull, Reconciler, SyncReport, WriteFailed,
    index::{Ids, identity},
};
use crate::{
    addr::to_addr6,
    datapath::{Capacities, Contents, Datapath, Op, RangeKey},
    k8s::{Age, ObjectRef},
    model::maglev,
    model::{Claim, ExternalFrontend, ExternalGroup, ExternalKind, Rejection},
};

/// One north-south service: a service port and address family.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupKey {
    /// The service.
    pub owner: ObjectRef,
    /// The service port's name.
    pub port_name: String,
    /// IPv6 (else IPv4).
    pub ipv6: bool,
}

impl GroupKey {
    fn of(owner: &ObjectRef, g: &ExternalGroup) -> Self {
        Self {
            owner: owner.clone(),
            port_name: g.port_name.clone(),
            ipv6: g.ipv6,
        }
    }
}

/// A group as programmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Programmed {
    id: u32,
    /// Its table region, when it has backends.
    region: Option<Region>,
}

/// A table region: where it starts in the table array, and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Region {
    start: u32,
    len: u32,
}

/// The reconciler's north-south state.
#[derive(Debug, Default)]
pub(super) struct External {
    /// The last good groups of each service.
    desired: BTreeMap<ObjectRef, Vec<ExternalGroup>>,
    /// The groups claiming each frontend, the winner first (see `model::Claim`).
    claims: BTreeMap<ServiceKey, BTreeSet<(Claim, GroupKey)>>,
    /// Groups with an id.
    groups: BTreeMap<GroupKey, Programmed>,
    pub(super) ids: Ids,
    /// Groups and frontends whose writes failed, retried on the next sync.
    retry_groups: BTreeSet<GroupKey>,
    retry_keys: BTreeSet<ServiceKey>,
    /// Groups refused for lack of map space (reported once), tried again in the sync after
    /// one that freed space (when what it freed is reusable).
    refused: BTreeSet<GroupKey>,
    /// The maps' occupancy when the refused groups were last tried.
    refused_at: [usize; 5],
    /// A sync freed space: try the refused groups again.
    retry_refused: bool,
}

/// Why phase 1 did not program a group.
#[derive(Debug, PartialEq, Eq)]
enum NotPrepared {
    /// A map is too small: refused until space is freed.
    Full,
    /// The object cannot be programmed (reported as a rejection).
    Rejected,
    /// A write failed: retried on the next sync.
    Failed,
}

/// What to revisit in one sync.
#[derive(Debug, Default)]
pub(super) struct Touched {
    groups: BTreeSet<GroupKey>,
    keys: BTreeSet<ServiceKey>,
}

impl Touched {
    /// Everything: the groups and frontends the maps hold and all desired ones (the first
    /// sync).
    pub(super) fn touch_all(&mut self, ext: &External, c: &Contents) {
        self.groups.extend(ext.groups.keys().cloned());
        self.keys.extend(c.external.keys().copied());
        for (owner, groups) in &ext.desired {
            for g in groups {
                self.groups.insert(GroupKey::of(owner, g));
                self.keys.extend(g.frontends.iter().map(|f| f.key));
            }
        }
    }
}

fn is_v6(key: &ServiceKey) -> bool {
    !key.addr.is_v4_mapped()
}

/// The affinity-match entries a group with id `id` wants: each backend of its table with
/// the affinity timeout, when it has session affinity.
fn affinity_matches(id: u32, want: &ExternalGroup) -> BTreeMap<ExternalAffinityMatchKey, u32> {
    if want.affinity_timeout_s == 0 {
        return BTreeMap::new();
    }
    want.backends
        .iter()
        .map(|b| {
            let key = ExternalAffinityMatchKey {
                svc_id: id,
                backend: b.endpoint(),
            };
            (key, want.affinity_timeout_s)
        })
        .collect()
}

/// The trie entry of a range for service id `id`.
fn range_key(id: u32, net: &IpNet) -> RangeKey {
    let (addr, bits) = match net {
        IpNet::V4(n) => (to_addr6(n.network().into()), 96 + u32::from(n.prefix_len())),
        IpNet::V6(n) => (to_addr6(n.network().into()), u32::from(n.prefix_len())),
    };
    (
        SOURCE_RANGE_ID_BITS + bits,
        SourceRange {
            svc_id_be: id.to_be(),
            addr,
        },
    )
}

/// The range a trie entry admits.
fn range_net(key: &RangeKey) -> Option<IpNet> {
    let bits = key.0.checked_sub(SOURCE_RANGE_ID_BITS)?;
    let ep = Endpoint::new(key.1.addr, 0);
    let ip = crate::addr::to_socket_addr(&ep).ip();
    let len = if ip.is_ipv4() {
        bits.checked_sub(96)?
    } else {
        bits
    };
    IpNet::new(ip, u8::try_from(len).ok()?).ok()
}

impl External {
    /// The state a reconciler adopting `c` starts from.
    pub(super) fn adopt(c: &Contents, caps: &Capacities) -> Self {
        let mut groups = BTreeMap::new();
        for (key, v) in &c.external {
            let Some(info) = c.external_info.get(&v.id) else {
                continue;
            };
            let (Some(ns), Some(name), Some(port_name)) =
                (info.namespace(), info.name(), info.port_name())
            else {
                continue;
            };
            let gk = GroupKey {
                owner: ObjectRef::new(ns, name),
                port_name: port_name.to_owned(),
                ipv6: is_v6(key),
            };
            groups.entry(gk).or_insert(Programmed {
                id: v.id,
                region: (v.table_size > 0 && c.tables.contains_key(&v.table_off)).then_some(
                    Region {
                        start: v.table_off,
                        len: v.table_size,
                    },
                ),
            });
        }
        let used = c
            .external_info
            .keys()
            .copied()
            .chain(c.external.values().map(|v| v.id));
        Self {
            groups,
            ids: Ids::from_used(caps.external_ids, used),
            ..Self::default()
        }
    }

    /// The groups `owner` last had.
    pub(super) fn desired_of(&self, owner: &ObjectRef) -> Option<&Vec<ExternalGroup>> {
        self.desired.get(owner)
    }

    /// Replaces the desired groups of `owner`, noting what changed.
    pub(super) fn set_desired(
        &mut self,
        owner: &ObjectRef,
        new: Option<Vec<ExternalGroup>>,
        touched: &mut Touched,
    ) {
        let old = match new {
            Some(groups) => self.desired.insert(owner.clone(), groups),
            None => self.desired.remove(owner),
        };
        let new = self.desired.get(owner);
        let unchanged = |g: &ExternalGroup, other: Option<&Vec<ExternalGroup>>| {
            other.is_some_and(|o| o.contains(g))
        };
        for g in old.iter().flatten() {
            if unchanged(g, new) {
                continue;
            }
            let gk = GroupKey::of(owner, g);
            for f in &g.frontends {
                touched.keys.insert(f.key);
                if let Some(set) = self.claims.get_mut(&f.key) {
                    set.remove(&(f.claim(&g.age), gk.clone()));
                    if set.is_empty() {
                        self.claims.remove(&f.key);
                    }
                }
            }
            touched.groups.insert(gk);
        }
        for g in new.into_iter().flatten() {
            if unchanged(g, old.as_ref()) {
                continue;
            }
            let gk = GroupKey::of(owner, g);
            for f in &g.frontends {
                touched.keys.insert(f.key);
                let claim = (f.claim(&g.age), gk.clone());
                self.claims.entry(f.key).or_default().insert(claim);
            }
            touched.groups.insert(gk);
        }
    }

    fn group(&self, gk: &GroupKey) -> Option<&ExternalGroup> {
        self.desired
            .get(&gk.owner)?
            .iter()
            .find(|g| g.port_name == gk.port_name && g.ipv6 == gk.ipv6)
    }

    /// Whether writes failed, or space was freed for refused groups, and a sync should run
    /// again soon.
    pub(super) fn needs_retry(&self) -> bool {
        !self.retry_groups.is_empty()
            || !self.retry_keys.is_empty()
            || (self.retry_refused && !self.refused.is_empty())
    }

    /// The endpoints whose flows each programmed group (by id) keeps: see
    /// [`ExternalGroup::endpoints`].
    pub(super) fn flow_endpoints(&self) -> BTreeMap<u32, BTreeSet<Endpoint>> {
        self.groups
            .iter()
            .filter_map(|(gk, p)| {
                let g = self.group(gk)?;
                Some((p.id, g.endpoints.iter().copied().collect()))
            })
            .collect()
    }

    /// The programmed groups: key, id and region start (for the CLI and tests).
    pub(super) fn programmed(&self) -> impl Iterator<Item = (&GroupKey, u32, Option<u32>)> {
        self.groups
            .iter()
            .map(|(k, p)| (k, p.id, p.region.map(|r| r.start)))
    }
}

impl<D: Datapath> Reconciler<D> {
    /// The north-south groups the maps hold for `owner` (after a restart, for a service that
    /// is now rejected), so what they have is kept.
    pub(super) fn adopt_external(&self, owner: &ObjectRef) -> Vec<ExternalGroup> {
        let m = &self.mirror;
        let mut out = Vec::new();
        for (gk, p) in self.ext.groups.iter().filter(|(gk, _)| &gk.owner == owner) {
            let entries: Vec<(&ServiceKey, &ExternalService)> =
                m.external.iter().filter(|(_, v)| v.id == p.id).collect();
            let Some((_, first)) = entries.first() else {
                continue;
            };
            let mut backends: Vec<Backend> = m
                .table_of(first)
                .unwrap_or_default()
                .iter()
                .filter_map(|id| m.backends.get(id).copied())
                .collect();
            backends.sort();
            backends.dedup();
            let limited = entries
                .iter()
                .any(|(_, v)| v.flags & EXTERNAL_F_SOURCE_RANGES != 0);
            let mut frontends: Vec<ExternalFrontend> = entries
                .iter()
                .map(|(key, v)| ExternalFrontend {
                    key: **key,
                    kind: if v.flags & EXTERNAL_F_SOURCE_RANGES != 0 {
                        ExternalKind::LoadBalancer
                    } else {
                        ExternalKind::ExternalIp
                    },
                })
                .collect();
            frontends.sort();
            let id_be = p.id.to_be();
            out.push(ExternalGroup {
                port_name: gk.port_name.clone(),
                ipv6: gk.ipv6,
                local: first.flags & EXTERNAL_F_LOCAL != 0,
                // All the maps tell of its endpoints.
                endpoints: backends.iter().map(Backend::endpoint).collect(),
                // Known from the maps only: after every claim a service makes now.
                age: Age::unknown(),
                backends,
                frontends,
                affinity_timeout_s: m.affinity_timeout_of(first),
                source_ranges: limited.then(|| {
                    m.ranges
                        .iter()
                        .filter(|k| k.1.svc_id_be == id_be)
                        .filter_map(range_net)
                        .collect()
                }),
            });
        }
        out
    }

    /// Brings the touched north-south groups and frontends to what is desired.
    pub(super) fn sync_external(&mut self, mut touched: Touched, report: &mut SyncReport) {
        touched
            .groups
            .extend(std::mem::take(&mut self.ext.retry_groups));
        touched
            .keys
            .extend(std::mem::take(&mut self.ext.retry_keys));
        if std::mem::take(&mut self.ext.retry_refused) {
            touched.groups.extend(self.ext.refused.iter().cloned());
        }
        // Phase 1: the groups that are desired.
        let mut failed: BTreeSet<GroupKey> = BTreeSet::new();
        let mut not_prepared: BTreeSet<GroupKey> = BTreeSet::new();
        for gk in &touched.groups {
            let Some(want) = self.ext.group(gk).cloned() else {
                self.ext.refused.remove(gk);
                continue;
            };
            match self.prepare(gk, &want, report) {
                Ok(()) => {
                    self.ext.refused.remove(gk);
                }
                Err(NotPrepared::Failed) => {
                    failed.insert(gk.clone());
                }
                Err(NotPrepared::Full | NotPrepared::Rejected) => {
                    not_prepared.insert(gk.clone());
                }
            }
            // Its frontends may need new values (id, region, flags).
            touched.keys.extend(want.frontends.iter().map(|f| f.key));
        }
        // Phase 2: frontends.
        for key in &touched.keys {
            if self.frontend(key, report).is_err() {
                self.ext.retry_keys.insert(*key);
            }
        }
        // Phase 3: what nothing names any more.
        for gk in &touched.groups {
            if failed.contains(gk) || not_prepared.contains(gk) {
                continue;
            }
            let done = match self.ext.group(gk).cloned() {
                Some(want) => self.drop_stale_ranges(gk, &want, report),
                None => self.remove_group(gk, report),
            };
            if done.is_err() {
                self.ext.retry_groups.insert(gk.clone());
            }
        }
        self.ext.retry_groups.extend(failed);
    }

    /// Notes for deletion after a grace period a table region a group switched away from,
    /// and its backends (those nothing else names by then).
    fn retire_region(&mut self, region: Option<Region>) {
        if region.is_some() {
            self.pending.regions.extend(region.map(|r| r.start));
            let backends = self.table_backends(region);
            self.pending.backends.extend(backends);
        }
    }

    /// Whether a map a north-south group needs holds fewer entries than when the refused
    /// groups were last tried (then the next [`Self::sync_external`] tries them); notes the
    /// occupancy for next time.
    pub(super) fn ext_space_freed(&mut self) -> bool {
        let now = self.ext_occupancy();
        let freed = now.iter().zip(self.ext.refused_at).any(|(n, t)| *n < t);
        self.ext.refused_at = now;
        self.ext.retry_refused = freed && !self.ext.refused.is_empty();
        self.ext.retry_refused
    }

    /// Entries in the maps a north-south group takes room in: backends, table entries in
    /// use, ids, source ranges, affinity matches.
    fn ext_occupancy(&self) -> [usize; 5] {
        let c = &self.mirror;
        [
            c.backends.len(),
            c.tables.values().map(Vec::len).sum(),
            c.external_info.len(),
            c.ranges.len(),
            c.external_match.len(),
        ]
    }

    /// Refuses group `gk` for lack of space in `map` (reported the first time).
    fn refuse(
        &mut self,
        gk: &GroupKey,
        want: &ExternalGroup,
        map: &'static str,
        capacity: u32,
        report: &mut SyncReport,
    ) -> NotPrepared {
        if self.ext.refused.insert(gk.clone()) {
            report.full.push(MapFull {
                service: gk.owner.clone(),
                frontend: want.frontends[0].key,
                map,
                capacity,
            });
        }
        NotPrepared::Full
    }

    /// The backend ids a table region names.
    fn table_backends(&self, region: Option<Region>) -> BTreeSet<u32> {
        region
            .and_then(|r| self.mirror.tables.get(&r.start))
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Phase 1 for one group: backends, id, table, info, added source ranges, and its
    /// affinity matches (those of backends it no longer has go first, so affinity to them is
    /// not honoured even while the old table is in use).
    fn prepare(
        &mut self,
        gk: &GroupKey,
        want: &ExternalGroup,
        report: &mut SyncReport,
    ) -> Result<(), NotPrepared> {
        let m_size = self.limits.table_size(want.backends.len());
        let current = self.ext.groups.get(gk).copied();
        // Capacity first: nothing is written for a group that cannot fit.
        let new_backends: Vec<Backend> = want
            .backends
            .iter()
            .filter(|b| !self.idx.backend_ids.contains_key(b))
            .copied()
            .collect();
        if self.mirror.backends.len() + new_backends.len() > self.caps.backends as usize {
            let caps = self.caps.backends;
            return Err(self.refuse(gk, want, maps::BACKENDS, caps, report));
        }
        // A new table goes to a free region, which the frontends switch to in one write each
        // (phase 2), so a packet sees the old table or the new one, never a mix; the old
        // region is cleared after a grace period. An unchanged table keeps its region.
        let order: Vec<u32> = if want.backends.is_empty() {
            Vec::new()
        } else {
            let weighted: Vec<(Endpoint, u32)> =
                want.backends.iter().map(|b| (b.endpoint(), 1)).collect();
            maglev::table(&weighted, m_size)
        };
        let unchanged = |r: &Region| {
            let have = self.mirror.tables.get(&r.start);
            r.len == m_size
                && new_backends.is_empty()
                && have.is_some_and(|t| {
                    t.len() == order.len()
                        && order.iter().zip(t).all(|(i, id)| {
                            self.idx.backend_ids.get(&want.backends[*i as usize]) == Some(id)
                        })
                })
        };
        let kept = current.and_then(|p| p.region).filter(|r| unchanged(r));
        let region = match kept {
            _ if order.is_empty() => None,
            Some(r) => Some(r),
            None => {
                if let Some(start) = self.free_region(m_size) {
                    Some(Region { start, len: m_size })
                } else {
                    let caps = self.caps.table_entries;
                    return Err(self.refuse(gk, want, maps::TABLES, caps, report));
                }
            }
        };
        let id = if let Some(p) = current {
            p.id
        } else {
            let family = if gk.ipv6 { "IPv6" } else { "IPv4" };
            let name = format!("{}:{}/{family}", gk.owner, gk.port_name);
            if let Some(id) = self.ext.ids.take(identity(&name)) {
                id
            } else {
                let caps = self.caps.external_ids;
                return Err(self.refuse(gk, want, maps::EXTERNAL_INFO, caps, report));
            }
        };
        let ranges: BTreeSet<RangeKey> = want
            .source_ranges
            .iter()
            .flatten()
            .map(|n| range_key(id, n))
            .collect();
        let new_ranges = ranges.difference(&self.mirror.ranges).count();
        if self.mirror.ranges.len() + new_ranges > self.caps.ranges as usize {
            if current.is_none() {
                self.ext.ids.release(id);
            }
            let caps = self.caps.ranges;
            return Err(self.refuse(gk, want, maps::SOURCE_RANGES, caps, report));
        }
        let matches = affinity_matches(id, want);
        let new_matches = matches
            .keys()
            .filter(|k| !self.mirror.external_match.contains_key(k))
            .count();
        if self.mirror.external_match.len() + new_matches > self.caps.external_match as usize {
            if current.is_none() {
                self.ext.ids.release(id);
            }
            let caps = self.caps.external_match;
            return Err(self.refuse(gk, want, maps::EXTERNAL_AFFINITY_MATCH, caps, report));
        }

        let mut ops: Vec<Op> = self
            .mirror
            .external_matches_of(id)
            .filter(|(k, _)| !matches.contains_key(k))
            .map(|(k, _)| Op::DeleteExternalMatch(*k))
            .collect();
        let mut ids_of: BTreeMap<Backend, u32> = BTreeMap::new();
        let mut taken = Vec::new();
        for b in &want.backends {
            let bid = if let Some(bid) = self.idx.backend_ids.get(b) {
                *bid
            } else {
                // The backend map has room (checked above), so an id is free; this
                // only guards that.
                let Some(bid) = self.idx.take_backend_id(b) else {
                    for t in taken {
                        self.idx.backend_alloc.release(t);
                    }
                    if current.is_none() {
                        self.ext.ids.release(id);
                    }
                    let caps = self.caps.backends;
                    return Err(self.refuse(gk, want, maps::BACKENDS, caps, report));
                };
                taken.push(bid);
                ops.push(Op::ResetBackendCounters(bid));
                ops.push(Op::PutBackend(bid, *b));
                bid
            };
            ids_of.insert(*b, bid);
        }
        if current.is_none() {
            ops.push(Op::ResetCounters(id));
        }
        if let Some(Region { start, .. }) = region.filter(|_| kept.is_none()) {
            let table: Vec<u32> = order
                .iter()
                .map(|i| ids_of[&want.backends[*i as usize]])
                .collect();
            ops.push(Op::PutTable {
                start,
                at: 0,
                ids: table,
            });
        }
        if let Some(info) = ServiceInfo::new(&gk.owner.namespace, &gk.owner.name, &want.port_name) {
            if self.mirror.external_info.get(&id) != Some(&info) {
                ops.push(Op::PutExternalInfo(id, info));
            }
        } else {
            report.rejected.push((
                gk.owner.clone(),
                Rejection::NameTooLong {
                    what: "service",
                    value: gk.owner.to_string(),
                    max: lb_common::service::NAME_MAX,
                },
            ));
            return Err(NotPrepared::Rejected);
        }
        ops.extend(
            ranges
                .difference(&self.mirror.ranges)
                .map(|k| Op::PutRange(*k)),
        );
        ops.extend(
            matches
                .iter()
                .filter(|(k, t)| self.mirror.external_match.get(k) != Some(t))
                .map(|(k, t)| Op::PutExternalMatch(*k, *t)),
        );
        if !ops.is_empty() {
            report.frontends_changed += 1;
        }
        let result = self.write_all(ops, report);
        // The id and region are the group's once anything was written for it; an id never
        // written is given back.
        if result.is_ok() || self.mirror.external_info.contains_key(&id) {
            // The frontends switch to the new table only once it is all written.
            let written =
                |r: &Region| self.mirror.tables.get(&r.start).map(Vec::len) == Some(r.len as usize);
            let region = if result.is_ok() {
                region
            } else {
                region
                    .filter(written)
                    .or_else(|| current.and_then(|p| p.region))
            };
            self.ext
                .groups
                .insert(gk.clone(), Programmed { id, region });
            let old = current.and_then(|p| p.region);
            if old != region {
                self.retire_region(old);
            }
        } else if current.is_none() {
            self.ext.ids.release(id);
        }
        if result.is_err() {
            for b in taken
                .iter()
                .filter(|b| !self.mirror.backends.contains_key(b))
            {
                self.idx.backend_alloc.release(*b);
            }
        }
        result.map_err(|WriteFailed| NotPrepared::Failed)
    }

    /// The first free region of `size` entries (first fit): one overlapping no region
    /// written (regions are cleared only once out of use) or held by a group.
    fn free_region(&self, size: u32) -> Option<u32> {
        let cap = u64::from(self.caps.table_entries);
        let mut used: Vec<(u64, u64)> = self
            .mirror
            .tables
            .iter()
            .map(|(s, t)| (u64::from(*s), u64::from(*s) + t.len() as u64))
            .chain(
                self.ext
                    .groups
                    .values()
                    .filter_map(|p| p.region)
                    .map(|r| (u64::from(r.start), u64::from(r.start) + u64::from(r.len))),
            )
            .collect();
        used.sort_unstable();
        let mut start = 0u64;
        for (s, e) in used {
            if s >= start + u64::from(size) {
                break;
            }
            start = start.max(e);
        }
        (start + u64::from(size) <= cap)
            .then(|| u32::try_from(start).ok())
            .flatten()
    }

    /// Phase 2 for one frontend: the winner's entry, or none.
    fn frontend(&mut self, key: &ServiceKey, report: &mut SyncReport) -> Result<(), WriteFailed> {
        let winner = self.ext.claims.get(key).and_then(|set| {
            let mut it = set.iter().map(|(_, gk)| gk);
            let winner = it.next()?.clone();
            report.conflicts.extend(it.map(|loser| Conflict {
                frontend: *key,
                winner: winner.owner.clone(),
                loser: loser.owner.clone(),
            }));
            Some(winner)
        });
        let want = winner.as_ref().and_then(|gk| {
            let p = self.ext.groups.get(gk)?;
            let g = self.ext.group(gk)?;
            let f = g.frontends.iter().find(|f| f.key == *key)?;
            let mut flags = 0;
            if g.local {
                flags |= EXTERNAL_F_LOCAL;
            }
            if f.kind == ExternalKind::LoadBalancer && g.source_ranges.is_some() {
                flags |= EXTERNAL_F_SOURCE_RANGES;
            }
            if g.affinity_timeout_s > 0 {
                flags |= EXTERNAL_F_AFFINITY;
            }
            Some(ExternalService {
                id: p.id,
                table_off: p.region.map_or(0, |r| r.start),
                table_size: p.region.map_or(0, |r| r.len),
                flags,
                _pad: 0,
            })
        });
        let have = self.mirror.external.get(key).copied();
        match (want, have) {
            (Some(w), h) if h != Some(w) => {
                if h.is_none() && self.mirror.external.len() >= self.caps.external as usize {
                    let gk = winner.expect("a value has a winner");
                    report.full.push(MapFull {
                        service: gk.owner,
                        frontend: *key,
                        map: maps::EXTERNAL_SERVICES,
                        capacity: self.caps.external,
                    });
                    return Ok(());
                }
                report.frontends_changed += 1;
                self.write(Op::PutExternal(*key, w), report)
            }
            // No claim: the frontend goes.
            (None, Some(_)) if winner.is_none() => {
                report.frontends_changed += 1;
                self.write(Op::DeleteExternal(*key), report)
            }
            // The winner could not be programmed (a full map): the frontend keeps what it
            // had; if that belongs to a group that is gone, phase 3 removes it.
            _ => Ok(()),
        }
    }

    /// Phase 3 for a group that stays: source ranges it no longer has.
    fn drop_stale_ranges(
        &mut self,
        gk: &GroupKey,
        want: &ExternalGroup,
        report: &mut SyncReport,
    ) -> Result<(), WriteFailed> {
        let Some(p) = self.ext.groups.get(gk).copied() else {
            return Ok(());
        };
        let keep: BTreeSet<RangeKey> = want
            .source_ranges
            .iter()
            .flatten()
            .map(|n| range_key(p.id, n))
            .collect();
        let id_be = p.id.to_be();
        let ops: Vec<Op> = self
            .mirror
            .ranges
            .iter()
            .filter(|k| k.1.svc_id_be == id_be && !keep.contains(k))
            .map(|k| Op::DeleteRange(*k))
            .collect();
        self.write_all(ops, report)
    }

    /// Phase 3 for a group that is gone: any entry still naming it, its ranges, info, id.
    /// Its table region is cleared with the other unused ones.
    fn remove_group(&mut self, gk: &GroupKey, report: &mut SyncReport) -> Result<(), WriteFailed> {
        let Some(p) = self.ext.groups.get(gk).copied() else {
            return Ok(());
        };
        let id_be = p.id.to_be();
        let mut ops: Vec<Op> = self
            .mirror
            .external
            .iter()
            .filter(|(_, v)| v.id == p.id)
            .map(|(k, _)| Op::DeleteExternal(*k))
            .collect();
        ops.extend(
            self.mirror
                .ranges
                .iter()
                .filter(|k| k.1.svc_id_be == id_be)
                .map(|k| Op::DeleteRange(*k)),
        );
        ops.extend(
            self.mirror
                .external_matches_of(p.id)
                .map(|(k, _)| Op::DeleteExternalMatch(*k)),
        );
        if self.mirror.external_info.contains_key(&p.id) {
            ops.push(Op::DeleteExternalInfo(p.id));
        }
        if !ops.is_empty() {
            report.frontends_changed += 1;
        }
        self.write_all(ops, report)?;
        self.ext.groups.remove(gk);
        self.retire_region(p.region);
        // Reused only after a grace period: a packet may still be counted under it.
        self.pending.external_ids.push(p.id);
        Ok(())
    }

    /// Zeroes those of the regions starting at `starts` that no entry and no group uses
    /// (after their grace period: see [`Reconciler::retire`]).
    pub(super) fn clear_unused_regions(
        &mut self,
        starts: &BTreeSet<u32>,
        report: &mut SyncReport,
    ) -> Result<(), WriteFailed> {
        let unused: Vec<(u32, u32)> = self
            .unused_regions()
            .into_iter()
            .filter(|s| starts.contains(s))
            .filter_map(|s| Some((s, self.mirror.tables.get(&s)?.len() as u32)))
            .collect();
        for (start, len) in unused {
            self.write(Op::ClearTable { start, len }, report)?;
        }
        Ok(())
    }

    /// The written table regions (by first index) that no entry and no group names.
    pub(super) fn unused_regions(&self) -> Vec<u32> {
        let named: BTreeSet<u32> = self
            .mirror
            .external
            .values()
            .filter(|v| v.table_size > 0)
            .map(|v| v.table_off)
            .chain(
                self.ext
                    .groups
                    .values()
                    .filter_map(|p| p.region.map(|r| r.start)),
            )
            .collect();
        self.mirror
            .tables
            .keys()
            .filter(|s| !named.contains(s))
            .copied()
            .collect()
    }

    /// Deletes north-south entries nothing refers to after a restart: info, ranges and
    /// affinity matches of ids no group has.
    pub(super) fn external_garbage(&mut self, report: &mut SyncReport) -> Result<(), WriteFailed> {
        let live: BTreeSet<u32> = self.ext.groups.values().map(|p| p.id).collect();
        let mut ops: Vec<Op> = self
            .mirror
            .external_info
            .keys()
            .filter(|id| !live.contains(id))
            .map(|id| Op::DeleteExternalInfo(*id))
            .collect();
        ops.extend(
            self.mirror
                .ranges
                .iter()
                .filter(|k| !live.contains(&u32::from_be(k.1.svc_id_be)))
                .map(|k| Op::DeleteRange(*k)),
        );
        ops.extend(
            self.mirror
                .external_match
                .keys()
                .filter(|k| !live.contains(&k.svc_id))
                .map(|k| Op::DeleteExternalMatch(*k)),
        );
        let dead: Vec<u32> = self
            .mirror
            .external_info
            .keys()
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        self.write_all(ops, report)?;
        self.pending.external_ids.extend(dead);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_keys_round_trip() {
        for net in [
            "192.0.2.0/24",
            "10.0.0.7/32",
            "0.0.0.0/0",
            "2001:db8::/32",
            "::/0",
        ] {
            let n: IpNet = net.parse().unwrap();
            let k = range_key(7, &n);
            assert_eq!(range_net(&k), Some(n), "{net}");
            assert_eq!(u32::from_be(k.1.svc_id_be), 7);
        }
        assert_eq!(
            range_key(1, &"192.0.2.0/24".parse().unwrap()).0,
            32 + 96 + 24
        );
    }
}
