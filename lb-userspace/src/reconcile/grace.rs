//! Deleting what syncs switched away from, once a grace period has passed.

use std::collections::BTreeSet;

use lb_common::ServiceKey;

use crate::datapath::{Datapath, Op};

use super::{Reconciler, WriteFailed, external::Touched, report::SyncReport};

/// What a sync switched away from: deleted after the next grace period (see
/// [`Reconciler::retire`]), when no program can still be reading it.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Service ids whose slots outside the live table go (all of them, and the info, once
    /// the id has no service entry).
    pub(super) services: BTreeSet<u32>,
    /// Backends to delete if nothing names them any more.
    pub(super) backends: BTreeSet<u32>,
    /// Table regions (by first index) to clear, if no entry and no group names them.
    pub(super) regions: BTreeSet<u32>,
    /// North-south ids given back.
    pub(super) external_ids: Vec<u32>,
}

impl Pending {
    pub(super) fn absorb(&mut self, other: Pending) {
        self.services.extend(other.services);
        self.backends.extend(other.backends);
        self.regions.extend(other.regions);
        self.external_ids.extend(other.external_ids);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.backends.is_empty()
            && self.regions.is_empty()
            && self.external_ids.is_empty()
    }
}

impl<D: Datapath> Reconciler<D> {
    /// Whether a sync switched away from something [`Self::retire`] is to delete (or left
    /// a frontend for it to program).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.waiting.is_empty() || !self.deferred.is_empty()
    }

    /// Asks for a grace period covering what the syncs switched away from so far.
    pub(super) fn ask_grace(&mut self) {
        if !self.pending.is_empty() {
            let n = self.dp.begin_grace();
            self.waiting.push((n, std::mem::take(&mut self.pending)));
        }
    }

    /// Deletes what the syncs switched away from whose grace period has ended (old slots and
    /// regions, removed frontends' slots and info, backends nothing names, freed ids), then
    /// programs the frontends refused for lack of space if that made room. It does not wait: the agent calls it every few milliseconds while
    /// [`Self::has_pending`], and grace periods (some milliseconds each) delay no sync. A
    /// frontend changed again before what its last change left is deleted is deferred to the
    /// retirement that deletes it.
    pub fn retire(&mut self) -> SyncReport {
        let mut report = SyncReport::default();
        let ended = self.dp.graces_ended();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|(n, _)| *n <= ended);
        self.waiting = waiting;
        let mut due = Pending::default();
        for (_, p) in ready {
            due.absorb(p);
        }
        self.delete(due, &mut report);
        // Frontends that changed again meanwhile and whose last change is now cleared up;
        // the others stay deferred, not planned again at every call.
        let ready: Vec<ServiceKey> = self
            .deferred
            .iter()
            .filter(|k| {
                self.mirror
                    .services
                    .get(k)
                    .is_none_or(|v| !self.pending_for(v.id))
            })
            .copied()
            .collect();
        for key in ready {
            self.deferred.remove(&key);
            self.program(key, false, &mut report);
        }
        // They are tried again when a map holds fewer entries than when they were last
        // tried.
        let (socket, external) = (self.socket_space_freed(), self.ext_space_freed());
        if socket || external {
            let waiting: Vec<ServiceKey> = self.refused.iter().copied().collect();
            for key in waiting {
                self.program(key, false, &mut report);
            }
            self.sync_external(Touched::default(), &mut report);
        }
        self.ask_grace();
        report
    }

    /// [`Self::retire`], after waiting for the grace periods of everything switched away
    /// from: for tools and tests that want the maps settled now.
    pub fn retire_now(&mut self) -> SyncReport {
        let mut report = SyncReport::default();
        self.flush(&mut report);
        report.merge(self.retire());
        report
    }

    /// Waits for the grace periods of everything switched away from, and deletes it: for a
    /// write that may land where it is.
    pub(super) fn flush(&mut self, report: &mut SyncReport) {
        self.ask_grace();
        let Some(last) = self.waiting.iter().map(|(n, _)| *n).max() else {
            return;
        };
        if let Err(e) = self.dp.wait_grace(last) {
            report.errors.push(e);
            return;
        }
        let mut due = Pending::default();
        for (_, p) in std::mem::take(&mut self.waiting) {
            due.absorb(p);
        }
        self.delete(due, report);
    }

    /// Whether service id `id` has slots waiting for deletion.
    pub(super) fn pending_for(&self, id: u32) -> bool {
        self.pending.services.contains(&id)
            || self.waiting.iter().any(|(_, p)| p.services.contains(&id))
    }

    /// Deletes what the syncs switched away from once a grace period has passed: slots
    /// outside each service's live table, the slots and info of services that are gone, table
    /// regions nothing names, and backends nothing names. Until then nothing of it is
    /// deleted or reused, so a program that read an entry just before it changed still finds
    /// the whole table it read.
    pub(super) fn delete(&mut self, pending: Pending, report: &mut SyncReport) {
        if pending.is_empty() {
            return;
        }
        let m = &self.mirror;
        let mut ops = Vec::new();
        for id in &pending.services {
            if let Some(value) = self
                .idx
                .service_keys
                .get(id)
                .and_then(|k| m.services.get(k))
            {
                let (generation, count) = (value.slot_gen(), u32::from(value.count));
                ops.extend(
                    m.slots_of(*id)
                        .filter(|(k, _)| k.generation() != generation || k.index() >= count)
                        .map(|(k, _)| Op::DeleteSlot(*k)),
                );
            } else {
                ops.extend(m.slots_of(*id).map(|(k, _)| Op::DeleteSlot(*k)));
                ops.extend(m.matches_of(*id).map(|k| Op::DeleteMatch(*k)));
                if m.info.contains_key(id) {
                    ops.push(Op::DeleteInfo(*id));
                }
            }
        }
        let done = self
            .write_all(ops, report)
            .and_then(|()| self.clear_unused_regions(&pending.regions, report))
            .and_then(|()| self.delete_unreferenced(pending.backends.clone(), report));
        match done {
            Ok(()) => {
                for id in &pending.external_ids {
                    self.ext.ids.release(*id);
                }
            }
            // Tried again by the next retirement (what was done is not redone).
            Err(WriteFailed) => self.waiting.insert(0, (0, pending)),
        }
    }
}
