//! The objects the sources reported, indexed by service, and which services changed.
//!
//! Reconciliation is level-based: what the store holds is the truth, and a service missing
//! from it is removed from the datapath. Every update returns the services whose objects
//! changed, so only those are recomputed and diffed: one changed EndpointSlice touches one
//! service. A relist (after a watch expired, or a re-read directory) is a diff against what
//! the store holds, never a reset.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    k8s::ObjectRef,
    model::endpoints::NodeInfo,
    model::{Slice, node_info},
};

/// A Kubernetes object a source reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    /// A Service.
    Service(Box<Service>),
    /// An EndpointSlice.
    EndpointSlice(Box<EndpointSlice>),
    /// A Node (only the agent's own is kept).
    Node(Box<Node>),
}

/// The kinds of [`Object`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Services.
    Service,
    /// EndpointSlices.
    EndpointSlice,
    /// Nodes.
    Node,
}

impl Object {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Service(_) => Kind::Service,
            Self::EndpointSlice(_) => Kind::EndpointSlice,
            Self::Node(_) => Kind::Node,
        }
    }

    /// Its identity, if it has a name.
    pub fn id(&self) -> Option<ObjectRef> {
        ObjectRef::of(match self {
            Self::Service(s) => &s.metadata,
            Self::EndpointSlice(s) => &s.metadata,
            Self::Node(n) => &n.metadata,
        })
    }
}

/// Every object a source knows, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Services.
    pub services: Vec<Service>,
    /// EndpointSlices.
    pub slices: Vec<EndpointSlice>,
    /// Nodes.
    pub nodes: Vec<Node>,
}

/// A change reported by a source.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// Everything the source knows: objects absent from it are gone.
    Snapshot(Snapshot),
    /// Every object of one kind (after a relist): objects of that kind absent from it are gone.
    Relist(Kind, Vec<Object>),
    /// An object was added or changed.
    Apply(Object),
    /// An object was deleted.
    Delete(Object),
}

/// Services and EndpointSlices by identity, slices indexed by their service, and this node.
/// Slices are kept as what the model reads of them ([`Slice`]).
#[derive(Debug, Default)]
pub struct Store {
    node_name: Option<String>,
    node: NodeInfo,
    node_ips: Vec<IpAddr>,
    /// Every address of the node's interfaces.
    interface_addresses: Vec<IpAddr>,
    node_deleting: bool,
    services: BTreeMap<ObjectRef, Service>,
    slices: BTreeMap<ObjectRef, Slice>,
    slices_by_service: BTreeMap<ObjectRef, BTreeSet<ObjectRef>>,
}

impl Store {
    /// An empty store for the node called `node_name`, if known.
    pub fn new(node_name: Option<String>) -> Self {
        Self {
            node: node_info(node_name.as_deref(), None),
            node_name,
            ..Self::default()
        }
    }

    /// Applies an update; returns the services to recompute.
    pub fn update(&mut self, update: Update) -> BTreeSet<ObjectRef> {
        let mut dirty = BTreeSet::new();
        match update {
            Update::Snapshot(s) => {
                let services = s.services.into_iter().map(|o| Object::Service(Box::new(o)));
                let slices = s
                    .slices
                    .into_iter()
                    .map(|o| Object::EndpointSlice(Box::new(o)));
                let nodes = s.nodes.into_iter().map(|o| Object::Node(Box::new(o)));
                dirty.extend(self.relist(Kind::Service, services.collect()));
                dirty.extend(self.relist(Kind::EndpointSlice, slices.collect()));
                dirty.extend(self.relist(Kind::Node, nodes.collect()));
            }
            Update::Relist(kind, objects) => dirty.extend(self.relist(kind, objects)),
            Update::Apply(object) => self.apply(object, &mut dirty),
            Update::Delete(object) => self.delete(object, &mut dirty),
        }
        dirty
    }

    /// Replaces every object of `kind` with `objects`.
    fn relist(&mut self, kind: Kind, objects: Vec<Object>) -> BTreeSet<ObjectRef> {
        let mut dirty = BTreeSet::new();
        let listed: BTreeSet<ObjectRef> = objects.iter().filter_map(Object::id).collect();
        let gone: Vec<ObjectRef> = match kind {
            Kind::Service => self
                .services
                .keys()
                .filter(|k| !listed.contains(*k))
                .cloned()
                .collect(),
            Kind::EndpointSlice => self
                .slices
                .keys()
                .filter(|k| !listed.contains(*k))
                .cloned()
                .collect(),
            Kind::Node => Vec::new(),
        };
        for key in gone {
            self.remove(kind, &key, &mut dirty);
        }
        if kind == Kind::Node && !objects.iter().any(|o| self.is_own_node(o)) {
            self.set_node(None, &mut dirty);
        }
        for object in objects.into_iter().filter(|o| o.kind() == kind) {
            self.apply(object, &mut dirty);
        }
        dirty
    }

    fn is_own_node(&self, object: &Object) -> bool {
        matches!(object, Object::Node(n) if n.metadata.name.is_some() && n.metadata.name == self.node_name)
    }

    fn set_node(&mut self, node: Option<&Node>, dirty: &mut BTreeSet<ObjectRef>) {
        let mut info = node_info(
            self.node_name.as_deref(),
            node.and_then(|n| n.metadata.labels.as_ref()),
        );
        info.addresses = self.node.addresses.clone();
        info.external_ip_cidrs = self.node.external_ip_cidrs.clone();
        self.node_ips = node.map(node_ips).unwrap_or_default();
        info.own_addresses = self.own_addresses();
        self.node_deleting = node.is_some_and(being_deleted);
        if info != self.node {
            self.node = info;
            // Topology depends on the node's zone: recompute everything.
            dirty.extend(self.services.keys().cloned());
        }
    }

    fn apply(&mut self, object: Object, dirty: &mut BTreeSet<ObjectRef>) {
        let Some(key) = object.id() else {
            return; // sources reject nameless objects earlier, with a message
        };
        match object {
            Object::Service(svc) => {
                if self.services.get(&key) != Some(&*svc) {
                    self.services.insert(key.clone(), *svc);
                    dirty.insert(key);
                }
            }
            Object::EndpointSlice(slice) => {
                let slice = Slice::new(&slice);
                if self.slices.get(&key) == Some(&slice) {
                    return;
                }
                self.remove(Kind::EndpointSlice, &key, dirty);
                if let Some(owner) = &slice.owner {
                    self.slices_by_service
                        .entry(owner.clone())
                        .or_default()
                        .insert(key.clone());
                    dirty.insert(owner.clone());
                }
                self.slices.insert(key, slice);
            }
            Object::Node(node) => {
                if self.is_own_node(&Object::Node(node.clone())) {
                    self.set_node(Some(&node), dirty);
                }
            }
        }
    }

    fn delete(&mut self, object: Object, dirty: &mut BTreeSet<ObjectRef>) {
        let own_node = self.is_own_node(&object);
        if let Some(key) = object.id() {
            match object.kind() {
                Kind::Node if own_node => self.set_node(None, dirty),
                Kind::Node => {}
                kind => self.remove(kind, &key, dirty),
            }
        }
    }

    fn remove(&mut self, kind: Kind, key: &ObjectRef, dirty: &mut BTreeSet<ObjectRef>) {
        match kind {
            Kind::Service => {
                if self.services.remove(key).is_some() {
                    dirty.insert(key.clone());
                }
            }
            Kind::EndpointSlice => {
                let Some(old) = self.slices.remove(key) else {
                    return;
                };
                if let Some(owner) = old.owner {
                    if let Some(set) = self.slices_by_service.get_mut(&owner) {
                        set.remove(key);
                        if set.is_empty() {
                            self.slices_by_service.remove(&owner);
                        }
                    }
                    dirty.insert(owner);
                }
            }
            Kind::Node => {}
        }
    }

    /// The service, if the store has it.
    pub fn service(&self, key: &ObjectRef) -> Option<&Service> {
        self.services.get(key)
    }

    /// The EndpointSlices labelled as belonging to the service.
    pub fn slices_of<'a>(&'a self, key: &ObjectRef) -> impl Iterator<Item = &'a Slice> {
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

    /// This node, as known so far.
    pub fn node(&self) -> &NodeInfo {
        &self.node
    }

    /// Sets this node's addresses that serve node ports; returns the services to recompute
    /// (all of them when the addresses changed).
    pub fn set_addresses(&mut self, mut addresses: Vec<IpAddr>) -> BTreeSet<ObjectRef> {
        addresses.sort();
        addresses.dedup();
        if addresses == self.node.addresses {
            return BTreeSet::new();
        }
        self.node.addresses = addresses;
        self.services.keys().cloned().collect()
    }

    /// Sets every address of the node's interfaces (which, with its Node object's, no
    /// external IP may claim); returns the services to recompute (all of them when they
    /// changed).
    pub fn set_interface_addresses(&mut self, mut all: Vec<IpAddr>) -> BTreeSet<ObjectRef> {
        all.sort();
        all.dedup();
        self.interface_addresses = all;
        let own = self.own_addresses();
        if own == self.node.own_addresses {
            return BTreeSet::new();
        }
        self.node.own_addresses = own;
        self.services.keys().cloned().collect()
    }

    /// Sets the external IPs this node honours (`--external-ip-cidrs`; empty: any). For
    /// start-up, before the first update.
    pub fn set_external_ip_cidrs(&mut self, cidrs: Vec<ipnet::IpNet>) {
        self.node.external_ip_cidrs = cidrs;
    }

    /// The node's own addresses: its interfaces' and its Node object's, sorted.
    fn own_addresses(&self) -> Vec<IpAddr> {
        let mut own: Vec<IpAddr> = self
            .interface_addresses
            .iter()
            .chain(&self.node_ips)
            .copied()
            .collect();
        own.sort();
        own.dedup();
        own
    }

    /// The InternalIP and ExternalIP addresses this node's Node object lists.
    pub fn node_ips(&self) -> &[IpAddr] {
        &self.node_ips
    }

    /// Whether this node is being deleted: its Node object has a deletion timestamp or the
    /// cluster autoscaler's [`TO_BE_DELETED_TAINT`].
    pub fn node_deleting(&self) -> bool {
        self.node_deleting
    }
}

/// The InternalIP and ExternalIP addresses of a Node.
/// The taint the cluster autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

fn being_deleted(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_some()
        || node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

fn node_ips(node: &Node) -> Vec<IpAddr> {
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    let mut ips: Vec<IpAddr> = addresses
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;
    use crate::testutil;

    fn svc(name: &str, ip: &str) -> Service {
        testutil::service("ns", name, &[ip], &[])
    }

    fn slice(name: &str, service: &str, family: &str) -> EndpointSlice {
        testutil::slice("ns", name, service, family, &[], &[])
    }

    fn node(name: &str, zone: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(
                    [(crate::k8s::object::ZONE_LABEL.to_string(), zone.to_string())].into(),
                ),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn refs(names: &[&str]) -> BTreeSet<ObjectRef> {
        names.iter().map(|n| ObjectRef::new("ns", *n)).collect()
    }

    fn snapshot(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Update {
        Update::Snapshot(Snapshot {
            services,
            slices,
            nodes: vec![],
        })
    }

    #[test]
    fn changes_to_slice_fields_the_model_does_not_read_dirty_nothing() {
        let mut store = Store::default();
        store.update(snapshot(
            vec![svc("a", "10.0.0.1")],
            vec![slice("a-1", "a", "IPv4")],
        ));
        let mut changed = slice("a-1", "a", "IPv4");
        changed.metadata.annotations = Some([("note".to_string(), "x".to_string())].into());
        changed.metadata.resource_version = Some("99".into());
        let dirty = store.update(Update::Apply(Object::EndpointSlice(Box::new(changed))));
        assert!(dirty.is_empty(), "{dirty:?}");
        let moved = slice("a-1", "a", "IPv6");
        let dirty = store.update(Update::Apply(Object::EndpointSlice(Box::new(moved))));
        assert_eq!(dirty, refs(&["a"]));
    }

    #[test]
    fn only_changed_services_are_dirty() {
        let mut store = Store::default();
        let first = (
            vec![svc("a", "10.0.0.1"), svc("b", "10.0.0.2")],
            vec![slice("a-1", "a", "IPv4"), slice("b-1", "b", "IPv4")],
        );
        assert_eq!(
            store.update(snapshot(first.0.clone(), first.1.clone())),
            refs(&["a", "b"])
        );
        assert_eq!(
            store.update(snapshot(first.0.clone(), first.1.clone())),
            refs(&[])
        );

        // A slice of b changes: only b.
        let mut second = first.clone();
        second.1[1] = slice("b-1", "b", "IPv6");
        assert_eq!(
            store.update(snapshot(second.0.clone(), second.1.clone())),
            refs(&["b"])
        );

        // a's service changes and c appears.
        let mut third = second.clone();
        third.0[0] = svc("a", "10.0.0.9");
        third.0.push(svc("c", "10.0.0.3"));
        assert_eq!(store.update(snapshot(third.0, third.1)), refs(&["a", "c"]));

        // Everything goes.
        assert_eq!(
            store.update(snapshot(vec![], vec![])),
            refs(&["a", "b", "c"])
        );
        assert_eq!(store.service_refs().count(), 0);
    }

    #[test]
    fn a_slice_moving_between_services_dirties_both() {
        let mut store = Store::default();
        store.update(snapshot(
            vec![svc("a", "10.0.0.1"), svc("b", "10.0.0.2")],
            vec![slice("s", "a", "IPv4")],
        ));
        let dirty = store.update(Update::Apply(Object::EndpointSlice(Box::new(slice(
            "s", "b", "IPv4",
        )))));
        assert_eq!(dirty, refs(&["a", "b"]));
        assert_eq!(store.slices_of(&ObjectRef::new("ns", "a")).count(), 0);
        assert_eq!(store.slices_of(&ObjectRef::new("ns", "b")).count(), 1);
    }

    #[test]
    fn incremental_updates_touch_one_service() {
        let mut store = Store::default();
        store.update(snapshot(
            vec![svc("a", "10.0.0.1"), svc("b", "10.0.0.2")],
            vec![slice("a-1", "a", "IPv4"), slice("b-1", "b", "IPv4")],
        ));
        let changed = Object::EndpointSlice(Box::new(slice("a-1", "a", "IPv6")));
        assert_eq!(store.update(Update::Apply(changed.clone())), refs(&["a"]));
        assert_eq!(
            store.update(Update::Apply(changed.clone())),
            refs(&[]),
            "no-op apply"
        );
        assert_eq!(store.update(Update::Delete(changed.clone())), refs(&["a"]));
        assert_eq!(
            store.update(Update::Delete(changed)),
            refs(&[]),
            "already gone"
        );
        let b = Object::Service(Box::new(svc("b", "10.0.0.2")));
        assert_eq!(store.update(Update::Delete(b)), refs(&["b"]));
        assert!(store.service(&ObjectRef::new("ns", "b")).is_none());
    }

    #[test]
    fn a_relist_of_one_kind_diffs_that_kind_only() {
        let mut store = Store::default();
        store.update(snapshot(
            vec![svc("a", "10.0.0.1"), svc("b", "10.0.0.2")],
            vec![slice("a-1", "a", "IPv4"), slice("b-1", "b", "IPv4")],
        ));
        // The relisted slices lack b-1 and have a-1 unchanged: only b is dirty, and the
        // services are untouched.
        let dirty = store.update(Update::Relist(
            Kind::EndpointSlice,
            vec![Object::EndpointSlice(Box::new(slice("a-1", "a", "IPv4")))],
        ));
        assert_eq!(dirty, refs(&["b"]));
        assert_eq!(store.service_refs().count(), 2);
    }

    #[test]
    fn the_own_nodes_zone_change_recomputes_everything() {
        let mut store = Store::new(Some("n1".into()));
        store.update(snapshot(
            vec![svc("a", "10.0.0.1"), svc("b", "10.0.0.2")],
            vec![],
        ));
        assert_eq!(store.node().zone, None);
        let own = |zone| Update::Apply(Object::Node(Box::new(node("n1", zone))));
        assert_eq!(store.update(own("z1")), refs(&["a", "b"]));
        assert_eq!(store.node().zone.as_deref(), Some("z1"));
        assert_eq!(store.update(own("z1")), refs(&[]));
        let other = Update::Apply(Object::Node(Box::new(node("n2", "z2"))));
        assert_eq!(store.update(other), refs(&[]), "other nodes are ignored");
        assert_eq!(
            store.update(Update::Relist(Kind::Node, vec![])),
            refs(&["a", "b"])
        );
        assert_eq!(store.node().zone, None);
        assert_eq!(store.node().name.as_deref(), Some("n1"));
    }

    #[test]
    fn a_node_being_deleted_is_noticed_without_recomputing() {
        use k8s_openapi::{
            api::core::v1::{NodeSpec, Taint},
            apimachinery::pkg::apis::meta::v1::Time,
        };
        let mut store = Store::new(Some("n1".into()));
        store.update(snapshot(vec![svc("a", "10.0.0.1")], vec![]));
        let apply = |n: Node| Update::Apply(Object::Node(Box::new(n)));
        store.update(apply(node("n1", "z1")));
        assert!(!store.node_deleting());
        let mut tainted = node("n1", "z1");
        tainted.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert_eq!(store.update(apply(tainted)), refs(&[]));
        assert!(store.node_deleting());
        let mut deleted = node("n1", "z1");
        deleted.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        store.update(apply(deleted));
        assert!(store.node_deleting());
        store.update(apply(node("n1", "z1")));
        assert!(!store.node_deleting());
    }
}
