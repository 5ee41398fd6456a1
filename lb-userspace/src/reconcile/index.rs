//! Ids derived from what they name, and the lookups the reconciler keeps beside its mirror
//! of the maps.

use std::collections::{BTreeSet, HashMap};

use lb_common::{Backend, ServiceKey};

use crate::datapath::{Capacities, Contents, Op};

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
pub(super) struct Ids {
    pub(super) max: u32,
    pub(super) used: BTreeSet<u32>,
}

/// The hash an object's id derives from (see [`Ids`]).
pub(super) fn identity(name: &str) -> u64 {
    let mut h = fnv::FnvHasher::default();
    std::hash::Hasher::write(&mut h, name.as_bytes());
    std::hash::Hasher::finish(&h)
}

impl Ids {
    pub(super) fn from_used(max: u32, used: impl IntoIterator<Item = u32>) -> Self {
        Self {
            max,
            used: used.into_iter().collect(),
        }
    }

    /// The id of the object whose identity hashes to `hash`, now taken; `None` when every
    /// id is taken.
    pub(super) fn take(&mut self, hash: u64) -> Option<u32> {
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

    pub(super) fn mark_used(&mut self, id: u32) {
        self.used.insert(id);
    }

    pub(super) fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// Lookups derived from the mirror, kept up to date write by write.
#[derive(Debug, Default)]
pub(super) struct Index {
    pub(super) backend_ids: HashMap<Backend, u32>,
    /// How many slots and affinity-match entries name each backend.
    pub(super) backend_refs: HashMap<u32, u32>,
    pub(super) service_ids: Ids,
    /// The frontend of each service id with a service entry.
    pub(super) service_keys: HashMap<u32, ServiceKey>,
    pub(super) backend_alloc: Ids,
}

impl Index {
    pub(super) fn build(c: &Contents, caps: &Capacities) -> Self {
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
    pub(super) fn take_backend_id(&mut self, ep: &Backend) -> Option<u32> {
        let name = crate::addr::to_socket_addr(ep).to_string();
        self.backend_alloc.take(identity(&name))
    }

    pub(super) fn unref(&mut self, backend: u32) {
        if let Some(n) = self.backend_refs.get_mut(&backend) {
            *n -= 1;
            if *n == 0 {
                self.backend_refs.remove(&backend);
            }
        }
    }

    /// Updates the index for `op`, given the mirror before it.
    pub(super) fn note(&mut self, before: &Contents, op: &Op) {
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
                let old = before.tables.get(start).map_or(&[][..], Vec::as_slice);
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
