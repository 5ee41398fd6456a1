//! The objects the sources reported, indexed by service, and which services changed.
//!
//! Reconciliation is level-based: what the store holds is the truth, and a service missing
//! from it is removed from the datapath. Each update returns the services whose objects
//! changed, so only those are recomputed and diffed.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::model::ObjectRef;

/// Every object a source knows, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub slices: Vec<EndpointSlice>,
}

/// Services and EndpointSlices by identity, with slices indexed by their service.
#[derive(Debug, Default)]
pub struct Store {
    services: BTreeMap<ObjectRef, Service>,
    slices: BTreeMap<ObjectRef, EndpointSlice>,
    slices_by_service: BTreeMap<ObjectRef, BTreeSet<ObjectRef>>,
}

impl Store {
    /// Replaces everything with `snapshot`; returns the services whose Service or
    /// EndpointSlices were added, changed or removed. Objects without a name are ignored
    /// (sources reject them earlier, with a message).
    pub fn replace(&mut self, snapshot: Snapshot) -> BTreeSet<ObjectRef> {
        let services: BTreeMap<ObjectRef, Service> = snapshot
            .services
            .into_iter()
            .filter_map(|s| Some((ObjectRef::of(&s.metadata)?, s)))
            .collect();
        let slices: BTreeMap<ObjectRef, EndpointSlice> = snapshot
            .slices
            .into_iter()
            .filter_map(|s| Some((ObjectRef::of(&s.metadata)?, s)))
            .collect();

        let mut dirty: BTreeSet<ObjectRef> = changed_keys(&self.services, &services).collect();
        for key in changed_keys(&self.slices, &slices) {
            for slice in [self.slices.get(&key), slices.get(&key)]
                .into_iter()
                .flatten()
            {
                dirty.extend(ObjectRef::owner_of_slice(slice));
            }
        }

        self.slices_by_service.clear();
        for (key, slice) in &slices {
            if let Some(owner) = ObjectRef::owner_of_slice(slice) {
                self.slices_by_service
                    .entry(owner)
                    .or_default()
                    .insert(key.clone());
            }
        }
        self.services = services;
        self.slices = slices;
        dirty
    }

    /// The service, if the store has it.
    pub fn service(&self, key: &ObjectRef) -> Option<&Service> {
        self.services.get(key)
    }

    /// The EndpointSlices labelled as belonging to the service.
    pub fn slices_of<'a>(&'a self, key: &ObjectRef) -> impl Iterator<Item = &'a EndpointSlice> {
        self.slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k))
    }

    /// Every service in the store.
    pub fn service_refs(&self) -> impl Iterator<Item = &ObjectRef> {
        self.services.keys()
    }
}

/// Keys added, removed or whose value differs between `old` and `new`.
fn changed_keys<'a, V: PartialEq>(
    old: &'a BTreeMap<ObjectRef, V>,
    new: &'a BTreeMap<ObjectRef, V>,
) -> impl Iterator<Item = ObjectRef> + 'a {
    let removed_or_changed = old
        .iter()
        .filter(|(k, v)| new.get(*k) != Some(*v))
        .map(|(k, _)| k.clone());
    let added = new.keys().filter(|k| !old.contains_key(*k)).cloned();
    removed_or_changed.chain(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil;

    fn svc(name: &str, ip: &str) -> Service {
        testutil::service("ns", name, &[ip], &[])
    }

    fn slice(name: &str, service: &str, family: &str) -> EndpointSlice {
        testutil::slice("ns", name, service, family, &[], &[])
    }

    fn refs(names: &[&str]) -> BTreeSet<ObjectRef> {
        names.iter().map(|n| ObjectRef::new("ns", *n)).collect()
    }

    #[test]
    fn only_changed_services_are_dirty() {
        let mut store = Store::default();
        let first = Snapshot {
            services: vec![svc("a", "10.0.0.1"), svc("b", "10.0.0.2")],
            slices: vec![slice("a-1", "a", "IPv4"), slice("b-1", "b", "IPv4")],
        };
        assert_eq!(store.replace(first.clone()), refs(&["a", "b"]));
        assert_eq!(store.replace(first.clone()), refs(&[]));

        // A slice of b changes: only b.
        let mut second = first.clone();
        second.slices[1] = slice("b-1", "b", "IPv6");
        assert_eq!(store.replace(second.clone()), refs(&["b"]));

        // a's service changes and c appears.
        let mut third = second.clone();
        third.services[0] = svc("a", "10.0.0.9");
        third.services.push(svc("c", "10.0.0.3"));
        assert_eq!(store.replace(third), refs(&["a", "c"]));

        // Everything goes.
        assert_eq!(store.replace(Snapshot::default()), refs(&["a", "b", "c"]));
        assert_eq!(store.service_refs().count(), 0);
    }

    #[test]
    fn a_slice_moving_between_services_dirties_both() {
        let mut store = Store::default();
        store.replace(Snapshot {
            services: vec![svc("a", "10.0.0.1"), svc("b", "10.0.0.2")],
            slices: vec![slice("s", "a", "IPv4")],
        });
        let dirty = store.replace(Snapshot {
            services: vec![svc("a", "10.0.0.1"), svc("b", "10.0.0.2")],
            slices: vec![slice("s", "b", "IPv4")],
        });
        assert_eq!(dirty, refs(&["a", "b"]));
        assert_eq!(store.slices_of(&ObjectRef::new("ns", "a")).count(), 0);
        assert_eq!(store.slices_of(&ObjectRef::new("ns", "b")).count(), 1);
    }
}
