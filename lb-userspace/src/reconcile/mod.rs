//! From desired frontends to ordered map writes.
//!
//! The [`Reconciler`] keeps a mirror of the maps ([`Contents`]), read back from the datapath
//! at start (so a restarted agent adopts what is programmed), and updated with each write
//! that succeeds, so it always equals the maps. A sync recomputes only the services that
//! changed and writes only the differences, per frontend in this order:
//!
//! new backends, affinity-match entries of new members, the new table's slots, the service's
//! info, the service entry (its count, table generation and affinity timeout: the one write
//! that switches lookups to the new table), and match entries of former members.
//!
//! A table that only gains slots at its end or loses its last ones is changed in place: the
//! count switches. Any other change writes the whole table in the other generation of slots
//! (see [`lb_common::service::SVC_F_GEN1`]), so no lookup ever sees a mix of old and new.
//! Removal starts with the service entry.
//!
//! What the switches leave behind (old slots, the slots and info of removed frontends, old
//! table regions, backends nothing names, freed ids) is deleted only after a grace period
//! ([`Datapath::begin_grace`], [`Reconciler::retire`]): a program that read an entry just
//! before it changed still finds the whole table it read. So every prefix of the writes is a
//! state in which any lookup finds a whole service, and a write that fails leaves the maps
//! consistent; the frontend is retried on the next sync.
//!
//! Slots keep their backends where possible. Capacity is checked before a frontend is
//! touched, counting the new table beside the old: a change that would overflow a map is
//! refused and the frontend keeps what it had.
//!
//! The files: this one holds the [`Reconciler`] and its sync; `plan` (from the store to
//! desired frontends), `socket` (the socket-level frontends' diffs and writes), `external`
//! (the north-south ones), `grace` (deletions after grace periods), `index` (ids and
//! lookups beside the mirror), `report` (what a sync did).

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{Endpoint, ServiceKey};

use crate::{
    datapath::{Capacities, Contents, Datapath, DatapathError, Op},
    k8s::{ObjectRef, store::Store},
    model::{Claim, DesiredFrontend, HealthCheck, Limits, share::Shares},
};

mod external;
mod grace;
mod index;
mod plan;
mod report;
mod socket;

pub use external::GroupKey;
pub use plan::Planner;
use report::WriteFailed;
pub use report::{Conflict, MapFull, StaleUdp, SyncReport};

use self::{
    external::{External, Touched},
    grace::Pending,
    index::Index,
};

/// Keeps a datapath equal to the desired state of the services in a [`Store`].
pub struct Reconciler<D: Datapath> {
    dp: D,
    mirror: Contents,
    idx: Index,
    caps: Capacities,
    limits: Limits,
    /// The last good frontends of each service.
    desired: BTreeMap<ObjectRef, Vec<DesiredFrontend>>,
    /// The services claiming each frontend.
    claims: BTreeMap<ServiceKey, BTreeSet<(Claim, ObjectRef)>>,
    /// Frontends whose writes failed, retried on the next sync.
    retry: BTreeSet<ServiceKey>,
    /// Frontends refused for lack of map space (reported once), tried again after a sync
    /// that freed space: they are programmed as soon as the space is there.
    refused: BTreeSet<ServiceKey>,
    /// The maps' occupancy when the refused frontends were last tried.
    refused_at: [usize; 4],
    /// Whether entries nothing refers to may exist (after a restart or a failed write).
    garbage: bool,
    /// What is to be deleted after a grace period not asked for yet.
    pending: Pending,
    /// What is to be deleted once grace period `n` has ended.
    waiting: Vec<(u64, Pending)>,
    /// Frontends changed again while what their last change left still awaits deletion:
    /// programmed by the retirement that deletes it.
    deferred: BTreeSet<ServiceKey>,
    /// The agent's own API server address, if it is a service frontend.
    api: Option<ServiceKey>,
    /// North-south state.
    ext: External,
    /// The planning step.
    planner: Planner,
    synced: bool,
}

impl<D: Datapath> Reconciler<D> {
    /// A reconciler that adopts what `dp` holds. Nothing is written until the first
    /// [`Self::sync`], which must be given the complete state of the sources: frontends
    /// that no service claims then are removed.
    pub fn new(dp: D, limits: Limits) -> Result<Self, DatapathError> {
        let mirror = dp.read()?;
        let caps = dp.capacities();
        let ext = External::adopt(&mirror, &caps);
        Ok(Self {
            idx: Index::build(&mirror, &caps),
            caps,
            dp,
            mirror,
            limits,
            desired: BTreeMap::new(),
            claims: BTreeMap::new(),
            retry: BTreeSet::new(),
            refused: BTreeSet::new(),
            refused_at: [0; 4],
            garbage: true,
            pending: Pending::default(),
            waiting: Vec::new(),
            deferred: BTreeSet::new(),
            api: None,
            ext,
            planner: Planner::new(limits, &caps, 100),
            synced: false,
        })
    }

    /// Limits each namespace to `percent` of each map (see [`crate::model::share`]); the whole map
    /// until called. Call it before the first [`Self::sync`].
    pub fn set_namespace_share(&mut self, percent: u32) {
        self.planner = Planner::new(self.limits, &self.caps, percent);
    }

    /// Each namespace's use of the maps, against its share.
    pub fn shares(&self) -> &Shares {
        self.planner.shares()
    }

    /// The health check node ports of the services that have one.
    pub fn health_checks(&self) -> &BTreeMap<ObjectRef, HealthCheck> {
        self.planner.health_checks()
    }

    /// The endpoints whose flows each programmed north-south service (by id) keeps, for the
    /// conntrack sweep ([`crate::datapath::conntrack`]).
    pub fn flow_endpoints(&self) -> BTreeMap<u32, BTreeSet<Endpoint>> {
        self.ext.flow_endpoints()
    }

    /// The programmed north-south services: group, id and table region start.
    pub fn external_groups(&self) -> impl Iterator<Item = (&GroupKey, u32, Option<u32>)> {
        self.ext.programmed()
    }

    /// What the maps hold.
    pub fn contents(&self) -> &Contents {
        &self.mirror
    }

    /// The datapath.
    pub fn datapath(&self) -> &D {
        &self.dp
    }

    /// The datapath, to steer a fake one in tests.
    #[cfg(test)]
    pub(crate) fn datapath_mut(&mut self) -> &mut D {
        &mut self.dp
    }

    /// Names the agent's own API server address when it is a service frontend (TCP): that
    /// frontend keeps its last backends rather than lose them all, so the agent never cuts
    /// itself off from the API that would tell it the endpoints are back.
    pub fn protect_api(&mut self, api: ServiceKey) {
        self.api = Some(api);
    }

    /// Whether a sync should run again soon to retry failed writes.
    pub fn needs_retry(&self) -> bool {
        !self.retry.is_empty() || self.ext.needs_retry()
    }

    /// Brings the frontends of the `dirty` services (and of frontends awaiting a retry) to
    /// what `store` asks for. The first sync considers every service and every programmed
    /// frontend.
    ///
    /// Each frontend is switched to its new table in one write. What it switched away from
    /// is deleted by [`Self::retire`], after a grace period.
    pub fn sync(&mut self, store: &Store, dirty: BTreeSet<ObjectRef>) -> SyncReport {
        let mut report = SyncReport::default();
        let mut touched: BTreeSet<ServiceKey> = std::mem::take(&mut self.retry);
        let first = !self.synced;
        let mut dirty = dirty;
        let mut ext_touched = Touched::default();
        if first {
            dirty.extend(store.service_refs().cloned());
            touched.extend(self.mirror.services.keys().copied());
            ext_touched.touch_all(&self.ext, &self.mirror);
        }

        loop {
            for owner in dirty {
                let plan = self.planner.plan(store, &owner, &mut report);
                self.apply_plan(
                    &owner,
                    plan,
                    first,
                    &mut report,
                    &mut touched,
                    &mut ext_touched,
                );
            }
            // Services refused for their namespace's share, where that namespace freed room.
            dirty = self.planner.take_retries();
            if dirty.is_empty() {
                break;
            }
        }

        let mut removals = Vec::new();
        for key in touched {
            if !self.claims.contains_key(&key) {
                removals.push(key);
                continue;
            }
            self.program(key, true, &mut report);
        }
        for key in removals {
            self.refused.remove(&key);
            self.deferred.remove(&key);
            self.remove(&key, &mut report);
        }
        let claims = &self.claims;
        self.refused.retain(|key| claims.contains_key(key));
        self.sync_external(ext_touched, &mut report);
        if self.garbage && report.errors.is_empty() {
            self.collect_garbage(&mut report);
        }
        self.synced = true;
        self.ask_grace();
        report
    }

    /// Performs one write and records it in the mirror; a failure goes into `report`.
    fn write(&mut self, op: Op, report: &mut SyncReport) -> Result<(), WriteFailed> {
        match self.dp.apply(&op) {
            Ok(()) => {
                self.idx.note(&self.mirror, &op);
                self.mirror.apply(&op);
                report.writes += 1;
                Ok(())
            }
            Err(e) => {
                report.errors.push(e);
                self.garbage = true;
                Err(WriteFailed)
            }
        }
    }

    /// Performs `ops` in order, up to the first that fails.
    fn write_all(&mut self, ops: Vec<Op>, report: &mut SyncReport) -> Result<(), WriteFailed> {
        ops.into_iter().try_for_each(|op| self.write(op, report))
    }

    /// Marks for deletion after the next grace period whatever no service refers to (left by
    /// an interrupted run or a failed write): slots outside live tables, the slots, info and
    /// affinity-match entries of ids without a service entry, backends nothing names, and
    /// table regions nothing names.
    fn collect_garbage(&mut self, report: &mut SyncReport) {
        let m = &self.mirror;
        self.pending.services.extend(m.service_ids_carried());
        self.pending.backends.extend(m.backends.keys().copied());
        let unused = self.unused_regions();
        self.pending.regions.extend(unused);
        if self.external_garbage(report).is_ok() {
            self.garbage = false;
        }
    }
}

#[cfg(test)]
mod tests;
