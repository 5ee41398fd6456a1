//! The datapath as the agent sees it: the maps it writes, one [`Op`] at a time.
//!
//! [`Datapath`] has two implementations: [`bpf::BpfDatapath`] (the pinned BPF maps) and
//! [`fake::FakeDatapath`] (in memory, checking after every write that no lookup could see a
//! half-written service). [`Contents`] is an exact copy of what the maps hold, used both to
//! adopt the maps after a restart and as the reconciler's mirror.

pub mod catalogue;
pub mod conntrack;

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    Addr6, AffinityMatchKey, Backend, Endpoint, ServiceInfo, ServiceKey, ServiceValue, SlotKey,
    external::{EXTERNAL_F_AFFINITY, ExternalAffinityMatchKey, ExternalService, SourceRange},
};

/// A `loadBalancerSourceRanges` trie entry: prefix length (over the id and the address) and
/// the data.
pub type RangeKey = (u32, SourceRange);

pub mod bpf;
pub mod fake;
pub mod raw;
pub mod rcu;

/// One write to one map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace a backend.
    PutBackend(u32, Backend),
    /// Insert or replace a slot.
    PutSlot(SlotKey, u32),
    /// Insert or replace a service's info.
    PutInfo(u32, ServiceInfo),
    /// Insert or replace a service frontend.
    PutService(ServiceKey, ServiceValue),
    /// Mark a backend as one of a service's, for session affinity.
    PutMatch(AffinityMatchKey),
    /// Remove a service frontend.
    DeleteService(ServiceKey),
    /// Remove a slot.
    DeleteSlot(SlotKey),
    /// Remove a service's info.
    DeleteInfo(u32),
    /// Remove a backend.
    DeleteBackend(u32),
    /// Unmark a backend of a service with session affinity.
    DeleteMatch(AffinityMatchKey),
    /// Insert or replace a north-south frontend.
    PutExternal(ServiceKey, ExternalService),
    /// Remove a north-south frontend.
    DeleteExternal(ServiceKey),
    /// Write backend ids into the lookup table region starting at `start`, from position
    /// `at` of the region on.
    PutTable {
        /// The region's first index in the table array.
        start: u32,
        /// The first position written, relative to `start`.
        at: u32,
        /// The backend ids.
        ids: Vec<u32>,
    },
    /// Zero the lookup table region at `start` (`len` entries): no longer used.
    ClearTable {
        /// The region's first index.
        start: u32,
        /// Its length.
        len: u32,
    },
    /// Insert or replace a north-south service's info.
    PutExternalInfo(u32, ServiceInfo),
    /// Remove a north-south service's info.
    DeleteExternalInfo(u32),
    /// Mark a backend as one of a north-south service's with session affinity, with the
    /// service's affinity timeout in seconds.
    PutExternalMatch(ExternalAffinityMatchKey, u32),
    /// Unmark a backend of a north-south service with session affinity.
    DeleteExternalMatch(ExternalAffinityMatchKey),
    /// Admit a source range.
    PutRange(RangeKey),
    /// Remove a source range.
    DeleteRange(RangeKey),
    /// Zero the counters of a north-south service id (a new service takes it).
    ResetCounters(u32),
    /// Zero the counters of a socket-level service id (a new frontend takes it).
    ResetServiceCounters(u32),
    /// Zero the counters of a backend id (a new backend takes it).
    ResetBackendCounters(u32),
}

/// Everything the maps the agent writes hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    /// Service map.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Slot map.
    pub slots: BTreeMap<SlotKey, u32>,
    /// Backend map.
    pub backends: BTreeMap<u32, Backend>,
    /// Service-info map.
    pub info: BTreeMap<u32, ServiceInfo>,
    /// Affinity-match map.
    pub affinity_match: BTreeSet<AffinityMatchKey>,
    /// North-south service map.
    pub external: BTreeMap<ServiceKey, ExternalService>,
    /// The lookup table regions in use, by first index.
    pub tables: BTreeMap<u32, Vec<u32>>,
    /// North-south service info.
    pub external_info: BTreeMap<u32, ServiceInfo>,
    /// Source ranges.
    pub ranges: BTreeSet<RangeKey>,
    /// North-south affinity-match map: affinity timeout by service id and backend.
    pub external_match: BTreeMap<ExternalAffinityMatchKey, u32>,
}

impl Contents {
    /// Applies one write.
    pub fn apply(&mut self, op: &Op) {
        match op {
            Op::PutBackend(id, ep) => {
                self.backends.insert(*id, *ep);
            }
            Op::PutSlot(key, backend) => {
                self.slots.insert(*key, *backend);
            }
            Op::PutInfo(id, info) => {
                self.info.insert(*id, *info);
            }
            Op::PutService(key, value) => {
                self.services.insert(*key, *value);
            }
            Op::DeleteService(key) => {
                self.services.remove(key);
            }
            Op::DeleteSlot(key) => {
                self.slots.remove(key);
            }
            Op::DeleteInfo(id) => {
                self.info.remove(id);
            }
            Op::DeleteBackend(id) => {
                self.backends.remove(id);
            }
            Op::PutMatch(key) => {
                self.affinity_match.insert(*key);
            }
            Op::DeleteMatch(key) => {
                self.affinity_match.remove(key);
            }
            Op::PutExternal(key, value) => {
                self.external.insert(*key, *value);
            }
            Op::DeleteExternal(key) => {
                self.external.remove(key);
            }
            Op::PutTable { start, at, ids } => {
                let region = self.tables.entry(*start).or_default();
                let end = *at as usize + ids.len();
                if region.len() < end {
                    region.resize(end, 0);
                }
                region[*at as usize..end].copy_from_slice(ids);
            }
            Op::ClearTable { start, .. } => {
                self.tables.remove(start);
            }
            Op::PutExternalInfo(id, info) => {
                self.external_info.insert(*id, *info);
            }
            Op::DeleteExternalInfo(id) => {
                self.external_info.remove(id);
            }
            Op::PutExternalMatch(key, timeout_s) => {
                self.external_match.insert(*key, *timeout_s);
            }
            Op::DeleteExternalMatch(key) => {
                self.external_match.remove(key);
            }
            Op::PutRange(key) => {
                self.ranges.insert(*key);
            }
            Op::DeleteRange(key) => {
                self.ranges.remove(key);
            }
            Op::ResetCounters(_) | Op::ResetServiceCounters(_) | Op::ResetBackendCounters(_) => {}
        }
    }

    /// The lookup table entries of a north-south frontend, if it has a whole table.
    pub fn table_of(&self, value: &ExternalService) -> Option<&[u32]> {
        self.tables
            .get(&value.table_off)
            .and_then(|t| t.get(..value.table_size as usize))
    }

    /// The affinity-match entries of service `id`.
    pub fn matches_of(&self, id: u32) -> impl Iterator<Item = &AffinityMatchKey> {
        let start = AffinityMatchKey {
            svc_id: id,
            backend_id: 0,
        };
        self.affinity_match
            .range(start..)
            .take_while(move |k| k.svc_id == id)
    }

    /// The north-south affinity-match entries of north-south service `id`, with their
    /// timeouts.
    pub fn external_matches_of(
        &self,
        id: u32,
    ) -> impl Iterator<Item = (&ExternalAffinityMatchKey, &u32)> {
        let first = ExternalAffinityMatchKey {
            svc_id: id,
            backend: Endpoint::new(Addr6::default(), 0),
        };
        self.external_match
            .range(first..)
            .take_while(move |(k, _)| k.svc_id == id)
    }

    /// The session affinity timeout a north-south entry has (0: none): its flag, and the
    /// timeout its service's matches carry.
    pub fn affinity_timeout_of(&self, value: &ExternalService) -> u32 {
        if value.flags & EXTERNAL_F_AFFINITY == 0 {
            return 0;
        }
        self.external_matches_of(value.id)
            .next()
            .map_or(0, |(_, t)| *t)
    }

    /// The slots a service entry's lookups read: those of its generation below its count.
    pub fn live_slots<'a>(
        &'a self,
        value: &ServiceValue,
    ) -> impl Iterator<Item = (&'a SlotKey, &'a u32)> + 'a {
        let (generation, count) = (value.slot_gen(), u32::from(value.count));
        self.slots_of(value.id)
            .filter(move |(k, _)| k.generation() == generation && k.index() < count)
    }

    /// Service ids that slots, info or affinity-match entries carry (also ids whose service
    /// entry is gone and whose entries await deletion).
    pub fn service_ids_carried(&self) -> impl Iterator<Item = u32> + '_ {
        let slots = self.slots.keys().map(|k| k.svc_id);
        slots
            .chain(self.info.keys().copied())
            .chain(self.affinity_match.iter().map(|m| m.svc_id))
    }

    /// The slots of service `id` (all of them: both generations, also any beyond its count),
    /// in key order.
    pub fn slots_of(&self, id: u32) -> impl Iterator<Item = (&SlotKey, &u32)> {
        let start = SlotKey {
            svc_id: id,
            slot: 0,
        };
        self.slots
            .range(start..)
            .take_while(move |(k, _)| k.svc_id == id)
    }

    /// Checks what the kernel relies on: every slot a service's count covers exists and
    /// names an existing backend, every service has its info, and every backend marked for
    /// affinity exists. An error names the first violation.
    pub fn check_lookups(&self) -> Result<(), String> {
        if let Some(m) = self
            .affinity_match
            .iter()
            .find(|m| !self.backends.contains_key(&m.backend_id))
        {
            return Err(format!("affinity match {m:?} names a missing backend"));
        }
        for (key, value) in &self.services {
            let frontend = crate::addr::frontend_string(key);
            if !self.info.contains_key(&value.id) {
                return Err(format!("{frontend} (id {}) has no info", value.id));
            }
            for slot in 0..u32::from(value.count) {
                let Some(backend) = self
                    .slots
                    .get(&SlotKey::new(value.id, value.slot_gen(), slot))
                else {
                    return Err(format!("{frontend} (id {}) misses slot {slot}", value.id));
                };
                if !self.backends.contains_key(backend) {
                    return Err(format!(
                        "{frontend} slot {slot} names missing backend {backend}"
                    ));
                }
            }
        }
        for (key, value) in &self.external {
            let frontend = crate::addr::frontend_string(key);
            if !self.external_info.contains_key(&value.id) {
                return Err(format!("external {frontend} (id {}) has no info", value.id));
            }
            if value.table_size == 0 {
                continue;
            }
            let Some(table) = self.table_of(value) else {
                return Err(format!(
                    "external {frontend} names table {}+{} that is not all written",
                    value.table_off, value.table_size
                ));
            };
            if let Some(b) = table.iter().find(|b| !self.backends.contains_key(b)) {
                return Err(format!(
                    "external {frontend} table names missing backend {b}"
                ));
            }
        }
        Ok(())
    }
}

/// Capacity of each map the agent writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Service map (also the service-info map).
    pub services: u32,
    /// Slot map.
    pub slots: u32,
    /// Backend map.
    pub backends: u32,
    /// Affinity-match map.
    pub affinity_match: u32,
    /// North-south service map.
    pub external: u32,
    /// Highest north-south service id (the info and counter maps hold ids 1 to this).
    pub external_ids: u32,
    /// Entries of the lookup table array.
    pub table_entries: u32,
    /// Source-ranges trie.
    pub ranges: u32,
    /// North-south affinity-match map.
    pub external_match: u32,
}

/// A failed datapath read or write.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A write failed; the maps hold what they held before it.
    #[error("writing {op:?}: {source}")]
    Write {
        /// The write.
        op: Box<Op>,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Waiting for the running programs to return failed.
    #[error("waiting for a grace period: {0}")]
    Grace(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A map could not be read.
    #[error("reading map {map}: {source}")]
    Read {
        /// The map's name.
        map: &'static str,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Where the agent writes.
pub trait Datapath {
    /// Everything the maps hold now.
    fn read(&self) -> Result<Contents, DatapathError>;
    /// Performs one write. On error nothing was written.
    fn apply(&mut self, op: &Op) -> Result<(), DatapathError>;
    /// The maps' capacities.
    fn capacities(&self) -> Capacities;
    /// Asks for a grace period and returns its number: once it has ended
    /// ([`Self::graces_ended`]), no program is still using a value it read before the call,
    /// so what the agent switched away from may be deleted or reused (see [`rcu`]).
    fn begin_grace(&mut self) -> u64;
    /// The last grace period that has ended.
    fn graces_ended(&self) -> u64;
    /// Waits until grace period `n` has ended.
    fn wait_grace(&mut self, n: u64) -> Result<(), DatapathError>;
}
