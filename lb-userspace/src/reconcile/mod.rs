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
//! ([`Datapath::begin_grace`], [`Reconciler::retire`]): a program that read an entry just before it changed still finds the
//! whole table it read. So every prefix of the writes is a state in which any lookup finds a
//! whole service, and a write that fails leaves the maps consistent; the frontend is retried
//! on the next sync.
//!
//! Slots keep their backends where possible. Capacity is checked before a frontend is
//! touched, counting the new table beside the old: a change that would overflow a map is
//! refused and the frontend keeps what it had.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use lb_common::{
    AffinityMatchKey, Backend, Endpoint, ServiceInfo, ServiceKey, ServiceValue, SlotKey, maps,
    service::SLOT_GEN1,
};

use crate::{
    datapath::{Capacities, Contents, Datapath, DatapathError, Op},
    k8s::store::Store,
    k8s::{Age, ObjectRef},
    model::share::{Shares, Usage},
    model::{self, Claim, DesiredFrontend, HealthCheck, Limits, Rejection, Slice},
};

mod external;

pub use external::GroupKey;
use external::{External, Touched};

/// A frontend two services claim; the first (by namespace and name) programs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The frontend.
    pub frontend: ServiceKey,
    /// The service that programs it.
    pub winner: ObjectRef,
    /// The service that is ignored for it.
    pub loser: ObjectRef,
}

/// A frontend change refused because a map would overflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFull {
    /// The service.
    pub service: ObjectRef,
    /// The frontend, which keeps what it had.
    pub frontend: ServiceKey,
    /// The map that is too small.
    pub map: &'static str,
    /// Its capacity.
    pub capacity: u32,
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Map writes performed.
    pub writes: usize,
    /// Frontends added, changed or removed.
    pub frontends_changed: usize,
    /// Services that could not be programmed; what they had is kept.
    pub rejected: Vec<(ObjectRef, Rejection)>,
    /// Parts of services that were skipped, and why.
    pub notes: Vec<(ObjectRef, String)>,
    /// Frontends claimed by more than one service.
    pub conflicts: Vec<Conflict>,
    /// External IPs services claim that are not honoured, and why.
    pub refused: Vec<(ObjectRef, String)>,
    /// Service ports over the per-service backend limit, served by a stable subset.
    pub limited: Vec<(ObjectRef, String)>,
    /// Frontend changes refused for lack of map space.
    pub full: Vec<MapFull>,
    /// Writes that failed; their frontends are retried on the next sync.
    pub errors: Vec<DatapathError>,
    /// UDP backends that left a frontend: connected sockets the hooks pointed at them are
    /// stale (see [`crate::agent::sockets`]).
    pub stale_udp: Vec<StaleUdp>,
}

impl SyncReport {
    /// Adds what `other` did to this report.
    pub fn merge(&mut self, other: SyncReport) {
        self.writes += other.writes;
        self.frontends_changed += other.frontends_changed;
        self.rejected.extend(other.rejected);
        self.notes.extend(other.notes);
        self.conflicts.extend(other.conflicts);
        self.refused.extend(other.refused);
        self.limited.extend(other.limited);
        self.full.extend(other.full);
        self.errors.extend(other.errors);
        self.stale_udp.extend(other.stale_udp);
    }
}

/// A backend that no longer serves a UDP frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleUdp {
    /// The frontend (VIP and port).
    pub frontend: Endpoint,
    /// The backend that left it.
    pub backend: Endpoint,
}

/// How much programming one frontend adds to the maps.
struct Growth {
    /// A new service entry.
    service: bool,
    /// The generation of its new table.
    generation: u32,
    /// Its slot count.
    slots: usize,
    /// Backends new to the backend map.
    backends: usize,
    /// New affinity-match entries.
    matches: usize,
}

/// Ids derived from what they name, from 1 to a maximum (the capacity of the maps the id
/// indexes).
///
/// An object's id is its identity's hash (FNV-1a of a stable string: a frontend's
/// `10.96.0.1:80/TCP`, a backend's `10.0.0.1:8080`, a north-south service's
/// `ns/name:port/IPv4`) modulo the maximum, plus one; if another object has that id, the
/// next free one after it. So the same object gets the same id on every node and after any
/// restart or reinstall, unless a collision moved it, and an id is never handed to another
/// object while anything still carries it. A restarted agent adopts the ids in the maps.
#[derive(Debug, Default)]
struct Ids {
    max: u32,
    used: BTreeSet<u32>,
}

/// The hash an object's id derives from (see [`Ids`]).
fn identity(name: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, name.as_bytes());
    std::hash::Hasher::finish(&h)
}

impl Ids {
    fn from_used(max: u32, used: impl IntoIterator<Item = u32>) -> Self {
        Self {
            max,
            used: used.into_iter().collect(),
        }
    }

    /// The id of the object whose identity hashes to `hash`, now taken; `None` when every
    /// id is taken.
    fn take(&mut self, hash: u64) -> Option<u32> {
        if self.max == 0 {
            return None;
        }
        let own = u32::try_from(hash % u64::from(self.max)).expect("below a u32") + 1;
        let id = (own..=self.max)
            .chain(1..own)
            .find(|id| !self.used.contains(id))?;
        self.used.insert(id);
        Some(id)
    }

    fn mark_used(&mut self, id: u32) {
        self.used.insert(id);
    }

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// Lookups derived from the mirror, kept up to date write by write.
#[derive(Debug, Default)]
struct Index {
    backend_ids: HashMap<Backend, u32>,
    /// How many slots and affinity-match entries name each backend.
    backend_refs: HashMap<u32, u32>,
    service_ids: Ids,
    /// The frontend of each service id with a service entry.
    service_keys: HashMap<u32, ServiceKey>,
    backend_alloc: Ids,
}

impl Index {
    fn build(c: &Contents, caps: &Capacities) -> Self {
        let mut backend_refs: HashMap<u32, u32> = HashMap::new();
        let matched = c.affinity_match.iter().map(|m| &m.backend_id);
        let tables = c.tables.values().flatten();
        for b in c.slots.values().chain(matched).chain(tables) {
            *backend_refs.entry(*b).or_default() += 1;
        }
        // An id is in use while anything carries it: its entry, or slots, info or
        // affinity-match entries not yet deleted.
        let service_ids = c
            .services
            .values()
            .map(|v| v.id)
            .chain(c.service_ids_carried());
        Self {
            backend_ids: c.backends.iter().map(|(id, ep)| (*ep, *id)).collect(),
            backend_refs,
            service_ids: Ids::from_used(caps.services, service_ids),
            service_keys: c.services.iter().map(|(k, v)| (v.id, *k)).collect(),
            backend_alloc: Ids::from_used(caps.backends, c.backends.keys().copied()),
        }
    }

    /// A new id for backend `ep`, derived from its address (see [`Ids`]); `None` when every
    /// id is taken.
    fn take_backend_id(&mut self, ep: &Backend) -> Option<u32> {
        let name = crate::addr::to_socket_addr(ep).to_string();
        self.backend_alloc.take(identity(&name))
    }

    fn unref(&mut self, backend: u32) {
        if let Some(n) = self.backend_refs.get_mut(&backend) {
            *n -= 1;
            if *n == 0 {
                self.backend_refs.remove(&backend);
            }
        }
    }

    /// Updates the index for `op`, given the mirror before it.
    fn note(&mut self, before: &Contents, op: &Op) {
        match op {
            Op::PutBackend(id, ep) => {
                if let Some(old) = before.backends.get(id) {
                    self.backend_ids.remove(old);
                }
                self.backend_ids.insert(*ep, *id);
                self.backend_alloc.mark_used(*id);
            }
            Op::DeleteBackend(id) => {
                if let Some(old) = before.backends.get(id) {
                    self.backend_ids.remove(old);
                    self.backend_alloc.release(*id);
                }
            }
            Op::PutSlot(key, backend) => {
                if let Some(old) = before.slots.get(key) {
                    self.unref(*old);
                }
                *self.backend_refs.entry(*backend).or_default() += 1;
            }
            Op::DeleteSlot(key) => {
                if let Some(old) = before.slots.get(key) {
                    self.unref(*old);
                }
            }
            Op::PutService(key, value) => {
                self.service_ids.mark_used(value.id);
                self.service_keys.insert(value.id, *key);
            }
            // The id stays taken until its slots and info are gone (see `retire`).
            Op::DeleteService(key) => {
                if let Some(old) = before.services.get(key) {
                    self.service_keys.remove(&old.id);
                }
            }
            Op::DeleteInfo(id) => {
                if !self.service_keys.contains_key(id) {
                    self.service_ids.release(*id);
                }
            }
            Op::PutMatch(key) => {
                if !before.affinity_match.contains(key) {
                    *self.backend_refs.entry(key.backend_id).or_default() += 1;
                }
            }
            Op::DeleteMatch(key) => {
                if before.affinity_match.contains(key) {
                    self.unref(key.backend_id);
                }
            }
            Op::PutTable { start, at, ids } => {
                let old = before.tables.get(start).map(Vec::as_slice).unwrap_or(&[]);
                let old = old.get(*at as usize..).unwrap_or(&[]);
                for (i, new) in ids.iter().enumerate() {
                    if let Some(o) = old.get(i) {
                        self.unref(*o);
                    }
                    *self.backend_refs.entry(*new).or_default() += 1;
                }
            }
            Op::ClearTable { start, .. } => {
                for o in before.tables.get(start).into_iter().flatten() {
                    self.unref(*o);
                }
            }
            Op::PutInfo(..)
            | Op::PutExternal(..)
            | Op::DeleteExternal(_)
            | Op::PutExternalInfo(..)
            | Op::DeleteExternalInfo(_)
            | Op::PutRange(_)
            | Op::DeleteRange(_)
            | Op::PutExternalMatch(..)
            | Op::DeleteExternalMatch(_)
            | Op::ResetCounters(_)
            | Op::ResetServiceCounters(_)
            | Op::ResetBackendCounters(_) => {}
        }
    }
}

/// What a sync switched away from: deleted after the next grace period (see
/// [`Reconciler::retire`]), when no program can still be reading it.
#[derive(Debug, Default)]
struct Pending {
    /// Service ids whose slots outside the live table go (all of them, and the info, once
    /// the id has no service entry).
    services: BTreeSet<u32>,
    /// Backends to delete if nothing names them any more.
    backends: BTreeSet<u32>,
    /// Table regions (by first index) to clear, if no entry and no group names them.
    regions: BTreeSet<u32>,
    /// North-south ids given back.
    external_ids: Vec<u32>,
}

impl Pending {
    fn absorb(&mut self, other: Pending) {
        self.services.extend(other.services);
        self.backends.extend(other.backends);
        self.regions.extend(other.regions);
        self.external_ids.extend(other.external_ids);
    }

    fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.backends.is_empty()
            && self.regions.is_empty()
            && self.external_ids.is_empty()
    }
}

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
    /// Health check node ports of services, with their local endpoint counts.
    health_checks: BTreeMap<ObjectRef, HealthCheck>,
    /// What each namespace's services take from the maps, against its share.
    shares: Shares,
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
            health_checks: BTreeMap::new(),
            shares: Shares::new(&caps, 100),
            synced: false,
        })
    }

    /// Limits each namespace to `percent` of each map (see [`crate::model::share`]); the whole map
    /// until called. Call it before the first [`Self::sync`].
    pub fn set_namespace_share(&mut self, percent: u32) {
        self.shares = Shares::new(&self.caps, percent);
    }

    /// Each namespace's use of the maps, against its share.
    pub fn shares(&self) -> &Shares {
        &self.shares
    }

    /// The health check node ports of the services that have one.
    pub fn health_checks(&self) -> &BTreeMap<ObjectRef, HealthCheck> {
        &self.health_checks
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

    fn keep_api_access(
        &self,
        owner: &ObjectRef,
        frontends: &mut [DesiredFrontend],
        report: &mut SyncReport,
    ) {
        let Some(api) = self.api else {
            return;
        };
        let Some(f) = frontends
            .iter_mut()
            .find(|f| f.key == api && f.backends.is_empty())
        else {
            return;
        };
        let kept = self
            .mirror
            .services
            .get(&api)
            .map(|v| self.programmed_backends(v))
            .unwrap_or_default();
        if !kept.is_empty() {
            report.notes.push((
                owner.clone(),
                format!(
                    "{} is the agent's own API server address and lost every endpoint: its last {} backends are kept",
                    crate::addr::frontend_string(&api),
                    kept.len()
                ),
            ));
            f.backends = kept;
        }
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
                self.plan(
                    store,
                    owner,
                    first,
                    &mut report,
                    &mut touched,
                    &mut ext_touched,
                );
            }
            // Services refused for their namespace's share, where that namespace freed room.
            dirty = self.shares.take_retries();
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

    /// Sets the desired frontends of `owner` from `store`: what the model makes of it, if
    /// it is valid and its namespace has room (else what it had, while its endpoints exist).
    fn plan(
        &mut self,
        store: &Store,
        owner: ObjectRef,
        first: bool,
        report: &mut SyncReport,
        touched: &mut BTreeSet<ServiceKey>,
        ext_touched: &mut Touched,
    ) {
        let Some(svc) = store.service(&owner) else {
            self.health_checks.remove(&owner);
            self.shares.release(&owner);
            self.set_desired(&owner, None, touched);
            self.ext.set_desired(&owner, None, ext_touched);
            return;
        };
        let planned = model::desired(svc, store.slices_of(&owner), store.node(), &self.limits)
            .and_then(|d| {
                let usage = Usage::of(&d.frontends, &d.external, &self.limits);
                match self.shares.admit(&owner, usage) {
                    Ok(()) => Ok(d),
                    Err(e) => Err(Rejection::NamespaceShare {
                        map: e.map,
                        used: e.used,
                        share: e.share,
                    }),
                }
            });
        let d = match planned {
            Ok(d) => d,
            Err(rejection) => {
                if first {
                    // Keep what an earlier run programmed for it.
                    let adopted = self.adopt(&owner);
                    let adopted_ext = self.adopt_external(&owner);
                    self.shares
                        .hold(&owner, Usage::of(&adopted, &adopted_ext, &self.limits));
                    if !adopted.is_empty() {
                        self.set_desired(&owner, Some(adopted), touched);
                    }
                    if !adopted_ext.is_empty() {
                        self.ext.set_desired(&owner, Some(adopted_ext), ext_touched);
                    }
                }
                let live: BTreeSet<IpAddr> =
                    store.slices_of(&owner).flat_map(Slice::addresses).collect();
                self.keep_live_backends(&owner, &live, touched, ext_touched);
                report.rejected.push((owner, rejection));
                return;
            }
        };
        report
            .notes
            .extend(d.notes.into_iter().map(|n| (owner.clone(), n)));
        report
            .refused
            .extend(d.refused.into_iter().map(|n| (owner.clone(), n)));
        report
            .limited
            .extend(d.limited.into_iter().map(|n| (owner.clone(), n)));
        let mut frontends = d.frontends;
        self.keep_api_access(&owner, &mut frontends, report);
        match d.health_check {
            Some(h) => self.health_checks.insert(owner.clone(), h),
            None => self.health_checks.remove(&owner),
        };
        self.set_desired(&owner, Some(frontends), touched);
        self.ext.set_desired(&owner, Some(d.external), ext_touched);
    }

    /// Whether a sync switched away from something [`Self::retire`] is to delete (or left
    /// a frontend for it to program).
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty() || !self.waiting.is_empty() || !self.deferred.is_empty()
    }

    /// Asks for a grace period covering what the syncs switched away from so far.
    fn ask_grace(&mut self) {
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
    fn flush(&mut self, report: &mut SyncReport) {
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
    fn pending_for(&self, id: u32) -> bool {
        self.pending.services.contains(&id)
            || self.waiting.iter().any(|(_, p)| p.services.contains(&id))
    }

    /// Deletes what the syncs switched away from once a grace period has passed: slots
    /// outside each service's live table, the slots and info of services that are gone, table
    /// regions nothing names, and backends nothing names. Until then nothing of it is
    /// deleted or reused, so a program that read an entry just before it changed still finds
    /// the whole table it read.
    fn delete(&mut self, pending: Pending, report: &mut SyncReport) {
        if pending.is_empty() {
            return;
        }
        let m = &self.mirror;
        let mut ops = Vec::new();
        for id in &pending.services {
            match self
                .idx
                .service_keys
                .get(id)
                .and_then(|k| m.services.get(k))
            {
                Some(value) => {
                    let (generation, count) = (value.slot_gen(), u32::from(value.count));
                    ops.extend(
                        m.slots_of(*id)
                            .filter(|(k, _)| k.generation() != generation || k.index() >= count)
                            .map(|(k, _)| Op::DeleteSlot(*k)),
                    );
                }
                None => {
                    ops.extend(m.slots_of(*id).map(|(k, _)| Op::DeleteSlot(*k)));
                    ops.extend(m.matches_of(*id).map(|k| Op::DeleteMatch(*k)));
                    if m.info.contains_key(id) {
                        ops.push(Op::DeleteInfo(*id));
                    }
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
            Err(()) => self.waiting.insert(0, (0, pending)),
        }
    }

    /// Whether a map a socket-level frontend needs holds fewer entries than when the
    /// refused frontends were last tried; notes the occupancy for next time.
    fn socket_space_freed(&mut self) -> bool {
        let now = self.occupancy();
        let freed = now.iter().zip(self.refused_at).any(|(n, then)| *n < then);
        self.refused_at = now;
        freed && !self.refused.is_empty()
    }

    /// Entries in the maps a socket-level frontend takes room in.
    fn occupancy(&self) -> [usize; 4] {
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
    fn program(&mut self, key: ServiceKey, report_conflicts: bool, report: &mut SyncReport) {
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

    /// Cuts the backends a rejected service keeps (what it last had programmed) down to
    /// those whose address is still an endpoint in its slices (`live`): its table shrinks as
    /// its pods go, and never sends to an address a deleted pod left, which another
    /// tenant's pod may get next.
    fn keep_live_backends(
        &mut self,
        owner: &ObjectRef,
        live: &BTreeSet<IpAddr>,
        touched: &mut BTreeSet<ServiceKey>,
        ext_touched: &mut Touched,
    ) {
        let is_live = |b: &Backend| live.contains(&crate::addr::to_ip(b.addr));
        if let Some(kept) = self.desired.get(owner)
            && kept.iter().any(|f| !f.backends.iter().all(is_live))
        {
            let mut kept = kept.clone();
            for f in &mut kept {
                f.backends.retain(is_live);
            }
            self.set_desired(owner, Some(kept), touched);
        }
        if let Some(kept) = self.ext.desired_of(owner)
            && kept.iter().any(|g| !g.backends.iter().all(is_live))
        {
            let mut kept = kept.clone();
            for g in &mut kept {
                g.backends.retain(is_live);
            }
            self.ext.set_desired(owner, Some(kept), ext_touched);
        }
    }

    /// Replaces the desired frontends of `owner`, updating claims and noting every frontend
    /// whose claims changed.
    fn set_desired(
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

    /// The frontends the maps hold for `owner`, as desired frontends.
    fn adopt(&self, owner: &ObjectRef) -> Vec<DesiredFrontend> {
        let m = &self.mirror;
        m.services
            .iter()
            .filter_map(|(key, value)| {
                let info = m.info.get(&value.id)?;
                if info.namespace()? != owner.namespace || info.name()? != owner.name {
                    return None;
                }
                let backends = self.programmed_backends(value);
                Some(DesiredFrontend {
                    key: *key,
                    // Known from the maps only: after every claim a service makes now.
                    claim: Claim {
                        borrowed: true,
                        age: Age::unknown(),
                    },
                    port_name: info.port_name()?.to_owned(),
                    backends,
                    affinity_timeout_s: value.affinity_timeout_s,
                })
            })
            .collect()
    }

    /// The backends a programmed service entry's live slots name, sorted, without duplicates.
    fn programmed_backends(&self, value: &ServiceValue) -> Vec<Backend> {
        let m = &self.mirror;
        let mut backends: Vec<Backend> = m
            .live_slots(value)
            .filter_map(|(_, b)| m.backends.get(b).copied())
            .collect();
        backends.sort();
        backends.dedup();
        backends
    }

    /// Performs one write and records it in the mirror.
    fn write(&mut self, op: Op, report: &mut SyncReport) -> Result<(), ()> {
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
                Err(())
            }
        }
    }

    fn write_all(&mut self, ops: Vec<Op>, report: &mut SyncReport) -> Result<(), ()> {
        ops.into_iter().try_for_each(|op| self.write(op, report))
    }

    /// Programs one frontend for `owner` as `want` describes it.
    fn upsert(&mut self, owner: &ObjectRef, want: &DesiredFrontend, report: &mut SyncReport) {
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
        let mut taken_backends = Vec::new();
        let mut new_backends = Vec::new();
        let mut out_of_ids = None;
        let ids: Vec<u32> = want
            .backends
            .iter()
            .map(|ep| match self.idx.backend_ids.get(ep) {
                Some(id) => *id,
                None => {
                    let Some(id) = self.idx.take_backend_id(ep) else {
                        out_of_ids = Some((maps::BACKENDS, self.caps.backends));
                        return 0;
                    };
                    taken_backends.push(id);
                    new_backends.push(Op::ResetBackendCounters(id));
                    new_backends.push(Op::PutBackend(id, *ep));
                    id
                }
            })
            .collect();
        let taken_service = match existing {
            Some(_) => None,
            None => {
                let hash = identity(&crate::addr::frontend_string(&key));
                let id = self.idx.service_ids.take(hash);
                if id.is_none() {
                    out_of_ids.get_or_insert((maps::SERVICES, self.caps.services));
                }
                id
            }
        };
        if let Some(full) = out_of_ids {
            for b in taken_backends {
                self.idx.backend_alloc.release(b);
            }
            if let Some(s) = taken_service {
                self.idx.service_ids.release(s);
            }
            self.refuse_frontend(owner, key, full, report);
            return;
        }
        let id = existing.map_or_else(|| taken_service.expect("taken above"), |v| v.id);
        let live = existing.map_or(0, |v| v.slot_gen());
        let old: Vec<Option<u32>> = (0..existing.map_or(0, |v| u32::from(v.count)))
            .map(|i| self.mirror.slots.get(&SlotKey::new(id, live, i)).copied())
            .collect();
        let slots = arrange(&old, &ids);
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
            affinity_timeout_s: want.affinity_timeout_s,
        };
        let members: BTreeSet<AffinityMatchKey> = if want.affinity_timeout_s == 0 {
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
        let matched: BTreeSet<AffinityMatchKey> = self.mirror.matches_of(id).copied().collect();

        // Gives back the ids taken above that no write has put in the maps.
        let release = |idx: &mut Index, mirror: &Contents| {
            for b in taken_backends
                .iter()
                .filter(|b| !mirror.backends.contains_key(b))
            {
                idx.backend_alloc.release(*b);
            }
            if let Some(s) = taken_service.filter(|_| !mirror.services.contains_key(&key)) {
                idx.service_ids.release(s);
            }
        };
        let new_matches = members.difference(&matched).count();
        let growth = Growth {
            service: existing.is_none(),
            generation,
            slots: slots.len(),
            backends: new_backends.len(),
            matches: new_matches,
        };
        if let Some(full) = self.overflow(id, &growth) {
            release(&mut self.idx, &self.mirror);
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

        // A new id starts its counters from zero (another frontend may have had it).
        let mut ops: Vec<Op> = taken_service
            .map(Op::ResetServiceCounters)
            .into_iter()
            .collect();
        ops.extend(new_backends);
        ops.extend(members.difference(&matched).map(|m| Op::PutMatch(*m)));
        for (slot, backend) in (0u32..).zip(&slots) {
            let k = SlotKey::new(id, generation, slot);
            if self.mirror.slots.get(&k) != Some(backend) {
                ops.push(Op::PutSlot(k, *backend));
            }
        }
        if self.mirror.info.get(&id) != Some(&info) {
            ops.push(Op::PutInfo(id, info));
        }
        if existing != Some(value) {
            ops.push(Op::PutService(key, value));
        }
        let previous = self.referenced_by(id);
        let stale = self.stale_udp(&key, &want.backends);
        ops.extend(matched.difference(&members).map(|m| Op::DeleteMatch(*m)));
        if ops.is_empty() {
            return;
        }
        report.frontends_changed += 1;
        // Slots outside the new table and backends it no longer names go after a grace
        // period.
        if generation != live || slots.len() < old.len() {
            self.pending.services.insert(id);
        }
        let kept: HashSet<u32> = ids.iter().copied().collect();
        self.pending
            .backends
            .extend(previous.into_iter().filter(|b| !kept.contains(b)));
        match self.write_all(ops, report) {
            Ok(()) => report.stale_udp.extend(stale),
            Err(()) => {
                release(&mut self.idx, &self.mirror);
                self.retry.insert(key);
            }
        }
    }

    /// Refuses frontend `key` of `owner` for lack of space in `full` (a map and its
    /// capacity): reported when first refused, tried again once a sync frees space.
    fn refuse_frontend(
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
    fn stale_udp(&self, key: &ServiceKey, keep: &[Backend]) -> Vec<StaleUdp> {
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
    fn referenced_by(&self, id: u32) -> BTreeSet<u32> {
        let slots = self.mirror.slots_of(id).map(|(_, b)| *b);
        slots
            .chain(self.mirror.matches_of(id).map(|m| m.backend_id))
            .collect()
    }

    /// The map (name and capacity) that programming a frontend of service `id` would
    /// overflow, if any.
    fn overflow(&self, id: u32, growth: &Growth) -> Option<(&'static str, u32)> {
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
    fn delete_unreferenced(
        &mut self,
        candidates: BTreeSet<u32>,
        report: &mut SyncReport,
    ) -> Result<(), ()> {
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
    fn remove(&mut self, key: &ServiceKey, report: &mut SyncReport) {
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
            Err(()) => {
                self.retry.insert(*key);
            }
        }
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

/// New slot contents for a service whose slots hold `old` (`None`: missing) and whose
/// backends should be `want`: backends that stay keep their slot, new backends fill the
/// freed slots first, and the slot list is compacted from its end.
fn arrange(old: &[Option<u32>], want: &[u32]) -> Vec<u32> {
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

#[cfg(test)]
mod tests;
