//! The socket-level frontends: diffs against the mirror, capacity checks, and the ordered
//! writes that switch a frontend to its new table in one step.

use std::collections::{BTreeSet, HashSet};

use lb_common::{
    AffinityMatchKey, Backend, Endpoint, ServiceInfo, ServiceKey, ServiceValue, SlotKey, maps,
    service::SLOT_GEN1,
};

use crate::{
    datapath::{Contents, Datapath, Op},
    k8s::ObjectRef,
    model::{DesiredFrontend, Rejection},
};

use super::{
    Reconciler, WriteFailed,
    index::{Index, identity},
    report::{Conflict, MapFull, StaleUdp, SyncReport},
};

/// How much programming one frontend adds to the maps.
pub(super) struct Growth {
    /// A new service entry.
    pub(super) service: bool,
    /// The generation of its new table.
    pub(super) generation: u32,
    /// Its slot count.
    pub(super) slots: usize,
    /// Backends new to the backend map.
    pub(super) backends: usize,
    /// New affinity-match entries.
    pub(super) matches: usize,
}

/// The ids a frontend's change takes: one per backend (new ones taken for backends not in
/// the map yet, with the writes that put them there), and a service id for a new frontend.
#[derive(Default)]
struct Taken {
    /// The backend id of each wanted backend, in order.
    ids: Vec<u32>,
    /// The writes of the new backends (their counters reset, then the backend).
    backends: Vec<Op>,
    /// The backend ids newly taken.
    taken_backends: Vec<u32>,
    /// The service id newly taken.
    service: Option<u32>,
}

impl Taken {
    /// Gives back the ids taken that no write has put in the maps.
    fn release(&self, idx: &mut Index, mirror: &Contents, key: &ServiceKey) {
        for b in self
            .taken_backends
            .iter()
            .filter(|b| !mirror.backends.contains_key(b))
        {
            idx.backend_alloc.release(*b);
        }
        if let Some(s) = self.service.filter(|_| !mirror.services.contains_key(key)) {
            idx.service_ids.release(s);
        }
    }
}

/// A frontend's new table beside its live one.
struct Table {
    /// The live table's generation.
    live: u32,
    /// The live table's slots (`None`: missing).
    old: Vec<Option<u32>>,
    /// The new table's slots.
    slots: Vec<u32>,
    /// The new table's generation.
    generation: u32,
    /// The service entry that switches to it.
    value: ServiceValue,
    /// Its affinity-match entries.
    members: BTreeSet<AffinityMatchKey>,
}

/// New slot contents for a service whose slots hold `old` (`None`: missing) and whose
/// backends should be `want`: backends that stay keep their slot, new backends fill the
/// freed slots first, and the slot list is compacted from its end.
pub(super) fn arrange(old: &[Option<u32>], want: &[u32]) -> Vec<u32> {
    let wanted: HashSet<u32> = want.iter().copied().collect();
    let mut seen = HashSet::new();
    let mut slots: Vec<Option<u32>> = old
        .iter()
        .map(|b| b.filter(|b| wanted.contains(b) && seen.insert(*b)))
        .collect();
    let mut missing = want.iter().filter(|b| !seen.contains(*b)).copied();
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = missing.next();
    }
    slots.extend(missing.map(Some));
    let mut i = 0;
    while i < slots.len() {
        if slots[i].is_some() {
            i += 1;
            continue;
        }
        let last = slots.pop().expect("i < len");
        if i < slots.len() {
            slots[i] = last;
        }
    }
    slots
        .into_iter()
        .map(|s| s.expect("holes were filled"))
        .collect()
}

impl<D: Datapath> Reconciler<D> {
    /// Whether a map a socket-level frontend needs holds fewer entries than when the
    /// refused frontends were last tried; notes the occupancy for next time.
    pub(super) fn socket_space_freed(&mut self) -> bool {
        let now = self.occupancy();
        let freed = now.iter().zip(self.refused_at).any(|(n, then)| *n < then);
        self.refused_at = now;
        freed && !self.refused.is_empty()
    }

    /// Entries in the maps a socket-level frontend takes room in.
    pub(super) fn occupancy(&self) -> [usize; 4] {
        let c = &self.mirror;
        [
            c.services.len(),
            c.slots.len(),
            c.backends.len(),
            c.affinity_match.len(),
        ]
    }

    /// Programs frontend `key` as its first claimant wants it (reporting the other claimants
    /// as conflicts when `report_conflicts`).
    pub(super) fn program(
        &mut self,
        key: ServiceKey,
        report_conflicts: bool,
        report: &mut SyncReport,
    ) {
        let Some(claimants) = self.claims.get(&key) else {
            return;
        };
        let mut claimants = claimants.iter().map(|(_, owner)| owner);
        let winner = claimants
            .next()
            .expect("claim sets are never empty")
            .clone();
        if report_conflicts {
            report.conflicts.extend(claimants.map(|loser| Conflict {
                frontend: key,
                winner: winner.clone(),
                loser: loser.clone(),
            }));
        }
        let frontend = self.desired[&winner]
            .iter()
            .find(|f| f.key == key)
            .expect("claims follow desired")
            .clone();
        self.upsert(&winner, &frontend, report);
    }

    /// Replaces the desired frontends of `owner`, updating claims and noting every frontend
    /// whose claims changed.
    pub(super) fn set_desired(
        &mut self,
        owner: &ObjectRef,
        new: Option<Vec<DesiredFrontend>>,
        touched: &mut BTreeSet<ServiceKey>,
    ) {
        let old = match new {
            Some(frontends) => self.desired.insert(owner.clone(), frontends),
            None => self.desired.remove(owner),
        };
        for f in old.iter().flatten() {
            touched.insert(f.key);
            if let Some(set) = self.claims.get_mut(&f.key) {
                set.remove(&(f.claim.clone(), owner.clone()));
                if set.is_empty() {
                    self.claims.remove(&f.key);
                }
            }
        }
        for f in self.desired.get(owner).into_iter().flatten() {
            touched.insert(f.key);
            let claim = (f.claim.clone(), owner.clone());
            self.claims.entry(f.key).or_default().insert(claim);
        }
    }

    /// The backends a programmed service entry's live slots name, sorted, without duplicates.
    pub(super) fn programmed_backends(&self, value: &ServiceValue) -> Vec<Backend> {
        let m = &self.mirror;
        let mut backends: Vec<Backend> = m
            .live_slots(value)
            .filter_map(|(_, b)| m.backends.get(b).copied())
            .collect();
        backends.sort();
        backends.dedup();
        backends
    }

    /// Programs frontend `want` of `owner`, in named steps: the ids it needs
    /// ([`Self::take_ids`]), its new table ([`Self::new_table`]), the capacity check, the
    /// writes ([`Self::table_ops`]), and what the switch leaves for deletion after a grace
    /// period. A frontend whose last switch is still awaiting deletion is deferred.
    pub(super) fn upsert(
        &mut self,
        owner: &ObjectRef,
        want: &DesiredFrontend,
        report: &mut SyncReport,
    ) {
        let key = want.key;
        let Some(info) = ServiceInfo::new(&owner.namespace, &owner.name, &want.port_name) else {
            // The model checks lengths; this only guards the invariant.
            report.rejected.push((
                owner.clone(),
                Rejection::NameTooLong {
                    what: "service",
                    value: owner.to_string(),
                    max: lb_common::service::NAME_MAX,
                },
            ));
            return;
        };
        let existing = self.mirror.services.get(&key).copied();
        if existing.is_some_and(|v| self.pending_for(v.id)) {
            // Its last switch left slots that lookups may still read, where the new table
            // may go: it keeps its table until the retirement that deletes them (a grace
            // period, some milliseconds), which programs it as it is wanted then. No sync
            // waits for that.
            self.deferred.insert(key);
            return;
        }
        self.deferred.remove(&key);
        let taken = match self.take_ids(key, existing, want) {
            Ok(taken) => taken,
            Err(full) => {
                self.refuse_frontend(owner, key, full, report);
                return;
            }
        };
        let id = existing.map_or_else(|| taken.service.expect("taken above"), |v| v.id);
        let table = self.new_table(id, existing, &taken.ids, want.affinity_timeout_s);
        let matched: BTreeSet<AffinityMatchKey> = self.mirror.matches_of(id).copied().collect();
        let growth = Growth {
            service: existing.is_none(),
            generation: table.generation,
            slots: table.slots.len(),
            backends: taken.backends.len(),
            matches: table.members.difference(&matched).count(),
        };
        if let Some(full) = self.overflow(id, &growth) {
            taken.release(&mut self.idx, &self.mirror, &key);
            if self.has_pending() {
                // What earlier switches left may be what fills the map: deleted now, after
                // its grace period, and the frontend planned anew (a backend it counted on
                // may have gone).
                self.flush(report);
                if !self.has_pending() {
                    return self.upsert(owner, want, report);
                }
            }
            self.refuse_frontend(owner, key, full, report);
            return;
        }
        self.refused.remove(&key);

        let ops = self.table_ops(key, existing, info, &taken, &table, &matched);
        if ops.is_empty() {
            return;
        }
        let previous = self.referenced_by(id);
        let stale = self.stale_udp(&key, &want.backends);
        report.frontends_changed += 1;
        // Slots outside the new table and backends it no longer names go after a grace
        // period.
        if table.generation != table.live || table.slots.len() < table.old.len() {
            self.pending.services.insert(id);
        }
        let kept: HashSet<u32> = taken.ids.iter().copied().collect();
        self.pending
            .backends
            .extend(previous.into_iter().filter(|b| !kept.contains(b)));
        if let Ok(()) = self.write_all(ops, report) {
            report.stale_udp.extend(stale);
        } else {
            taken.release(&mut self.idx, &self.mirror, &key);
            self.retry.insert(key);
        }
    }

    /// The backend ids of `want`'s backends, taking new ones for backends not in the map,
    /// and a service id if the frontend has none; on running out of ids, gives back what it
    /// took and names the map (and capacity) that ran out.
    fn take_ids(
        &mut self,
        key: ServiceKey,
        existing: Option<ServiceValue>,
        want: &DesiredFrontend,
    ) -> Result<Taken, (&'static str, u32)> {
        let mut taken = Taken::default();
        let mut out_of_ids = None;
        for ep in &want.backends {
            if let Some(id) = self.idx.backend_ids.get(ep) {
                taken.ids.push(*id);
                continue;
            }
            let Some(id) = self.idx.take_backend_id(ep) else {
                out_of_ids = Some((maps::BACKENDS, self.caps.backends));
                taken.ids.push(0);
                continue;
            };
            taken.taken_backends.push(id);
            taken.backends.push(Op::ResetBackendCounters(id));
            taken.backends.push(Op::PutBackend(id, *ep));
            taken.ids.push(id);
        }
        if existing.is_none() {
            let hash = identity(&crate::addr::frontend_string(&key));
            taken.service = self.idx.service_ids.take(hash);
            if taken.service.is_none() {
                out_of_ids.get_or_insert((maps::SERVICES, self.caps.services));
            }
        }
        match out_of_ids {
            Some(full) => {
                for b in &taken.taken_backends {
                    self.idx.backend_alloc.release(*b);
                }
                if let Some(s) = taken.service {
                    self.idx.service_ids.release(s);
                }
                Err(full)
            }
            None => Ok(taken),
        }
    }

    /// The new table of service `id` (whose entry is `existing`) over backends `ids`: slots
    /// that keep their backend, the generation it goes to, its service entry, and its
    /// affinity-match members (none without affinity).
    fn new_table(
        &self,
        id: u32,
        existing: Option<ServiceValue>,
        ids: &[u32],
        affinity_timeout_s: u32,
    ) -> Table {
        let live = existing.map_or(0, |v| v.slot_gen());
        let old: Vec<Option<u32>> = (0..existing.map_or(0, |v| u32::from(v.count)))
            .map(|i| self.mirror.slots.get(&SlotKey::new(id, live, i)).copied())
            .collect();
        let slots = arrange(&old, ids);
        // The live table is extended or cut in place when every slot it keeps keeps its
        // backend (lookups under the old count see the old table, under the new one the new
        // table); any other change writes the whole new table in the other generation. Either
        // way the service entry switches the lookups in one write.
        let in_place = slots.iter().zip(&old).all(|(new, old)| Some(*new) == *old);
        let generation = if in_place { live } else { live ^ SLOT_GEN1 };
        let value = ServiceValue {
            id,
            count: u16::try_from(slots.len()).expect("the model limits backends to u16"),
            flags: ServiceValue::gen_flags(generation),
            affinity_timeout_s,
        };
        let members = if affinity_timeout_s == 0 {
            BTreeSet::new()
        } else {
            slots
                .iter()
                .map(|&backend_id| AffinityMatchKey {
                    svc_id: id,
                    backend_id,
                })
                .collect()
        };
        Table {
            live,
            old,
            slots,
            generation,
            value,
            members,
        }
    }

    /// The writes that switch frontend `key` to `table`, in order: counters of a new id,
    /// new backends, new affinity-match members, the table's slots, the info, the service
    /// entry (the switch), then the members that left. Empty when nothing changes.
    fn table_ops(
        &self,
        key: ServiceKey,
        existing: Option<ServiceValue>,
        info: ServiceInfo,
        taken: &Taken,
        table: &Table,
        matched: &BTreeSet<AffinityMatchKey>,
    ) -> Vec<Op> {
        let id = table.value.id;
        // A new id starts its counters from zero (another frontend may have had it).
        let mut ops: Vec<Op> = taken
            .service
            .map(Op::ResetServiceCounters)
            .into_iter()
            .collect();
        ops.extend(taken.backends.iter().cloned());
        ops.extend(table.members.difference(matched).map(|m| Op::PutMatch(*m)));
        for (slot, backend) in (0u32..).zip(&table.slots) {
            let k = SlotKey::new(id, table.generation, slot);
            if self.mirror.slots.get(&k) != Some(backend) {
                ops.push(Op::PutSlot(k, *backend));
            }
        }
        if self.mirror.info.get(&id) != Some(&info) {
            ops.push(Op::PutInfo(id, info));
        }
        if existing != Some(table.value) {
            ops.push(Op::PutService(key, table.value));
        }
        ops.extend(
            matched
                .difference(&table.members)
                .map(|m| Op::DeleteMatch(*m)),
        );
        ops
    }

    /// Refuses frontend `key` of `owner` for lack of space in `full` (a map and its
    /// capacity): reported when first refused, tried again once a sync frees space.
    pub(super) fn refuse_frontend(
        &mut self,
        owner: &ObjectRef,
        key: ServiceKey,
        full: (&'static str, u32),
        report: &mut SyncReport,
    ) {
        if self.refused.insert(key) {
            report.full.push(MapFull {
                service: owner.clone(),
                frontend: key,
                map: full.0,
                capacity: full.1,
            });
        }
    }

    /// The backends of a UDP frontend whose address and port are not in `keep`'s: once they
    /// are out of the maps, sockets pointed at them are stale.
    pub(super) fn stale_udp(&self, key: &ServiceKey, keep: &[Backend]) -> Vec<StaleUdp> {
        let Some(value) = self.mirror.services.get(key) else {
            return Vec::new();
        };
        if key.proto != lb_common::proto::UDP {
            return Vec::new();
        }
        let frontend = Endpoint::new(key.addr, key.port_be);
        self.programmed_backends(value)
            .into_iter()
            .map(|b| b.endpoint())
            .filter(|b| !keep.iter().any(|k| k.endpoint() == *b))
            .map(|backend| StaleUdp { frontend, backend })
            .collect()
    }

    /// The backends the slots and affinity-match entries of service `id` name.
    pub(super) fn referenced_by(&self, id: u32) -> BTreeSet<u32> {
        let slots = self.mirror.slots_of(id).map(|(_, b)| *b);
        slots
            .chain(self.mirror.matches_of(id).map(|m| m.backend_id))
            .collect()
    }

    /// The map (name and capacity) that programming a frontend of service `id` would
    /// overflow, if any.
    pub(super) fn overflow(&self, id: u32, growth: &Growth) -> Option<(&'static str, u32)> {
        let m = &self.mirror;
        let new_slots = (0..growth.slots as u32)
            .filter(|&slot| {
                !m.slots
                    .contains_key(&SlotKey::new(id, growth.generation, slot))
            })
            .count();
        let new_info = usize::from(!m.info.contains_key(&id));
        let c = &self.caps;
        let checks = [
            (
                maps::SERVICES,
                m.services.len() + usize::from(growth.service),
                c.services,
            ),
            (maps::SERVICE_INFO, m.info.len() + new_info, c.services),
            (maps::SLOTS, m.slots.len() + new_slots, c.slots),
            (
                maps::BACKENDS,
                m.backends.len() + growth.backends,
                c.backends,
            ),
            (
                maps::AFFINITY_MATCH,
                m.affinity_match.len() + growth.matches,
                c.affinity_match,
            ),
        ];
        checks
            .into_iter()
            .find(|(_, need, cap)| *need > *cap as usize)
            .map(|(name, _, cap)| (name, cap))
    }

    /// Deletes those of `candidates` that no slot or affinity-match entry names any more.
    pub(super) fn delete_unreferenced(
        &mut self,
        candidates: BTreeSet<u32>,
        report: &mut SyncReport,
    ) -> Result<(), WriteFailed> {
        let ops: Vec<Op> = candidates
            .into_iter()
            .filter(|b| {
                !self.idx.backend_refs.contains_key(b) && self.mirror.backends.contains_key(b)
            })
            .map(Op::DeleteBackend)
            .collect();
        self.write_all(ops, report)
    }

    /// Removes a frontend: the service entry, then its affinity-match entries; its slots,
    /// info and backends after a grace period.
    pub(super) fn remove(&mut self, key: &ServiceKey, report: &mut SyncReport) {
        let Some(value) = self.mirror.services.get(key).copied() else {
            return;
        };
        let previous = self.referenced_by(value.id);
        let stale = self.stale_udp(key, &[]);
        let mut ops = vec![Op::DeleteService(*key)];
        ops.extend(
            self.mirror
                .matches_of(value.id)
                .map(|m| Op::DeleteMatch(*m)),
        );
        report.frontends_changed += 1;
        // Its slots, info and id, and backends no one names, go after a grace period.
        self.pending.services.insert(value.id);
        self.pending.backends.extend(previous);
        match self.write_all(ops, report) {
            Ok(()) => report.stale_udp.extend(stale),
            Err(WriteFailed) => {
                self.retry.insert(*key);
            }
        }
    }
}
