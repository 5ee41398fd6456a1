//! Object identity: which service a Kubernetes object is ([`ObjectRef`]), how old it is
//! ([`Age`], which decides claims), and the labels the proxy reads.

use std::fmt;

use k8s_openapi::{
    api::discovery::v1::EndpointSlice, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

/// Label naming the service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label of services (and their slices) that another proxy implements.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Label of the EndpointSlices of headless services.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The node label naming its zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// The namespace (`default` when the object has none).
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectRef {
    /// A reference from its parts.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The identity of an object, or `None` when it has no name.
    pub fn of(meta: &ObjectMeta) -> Option<Self> {
        let name = meta.name.as_deref().filter(|n| !n.is_empty())?;
        Some(Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            name,
        ))
    }

    /// The service an EndpointSlice belongs to, from its label.
    pub fn owner_of_slice(slice: &EndpointSlice) -> Option<Self> {
        let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        let slice_ref = Self::of(&slice.metadata)?;
        Some(Self::new(slice_ref.namespace, service.as_str()))
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service's age, as claims compare it: its `creationTimestamp`, then its UID (services
/// without a timestamp, as hand-written manifests may be, come after all others). Never the
/// name: a tenant chooses names, not ages.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Age {
    unknown: bool,
    created: Option<jiff::Timestamp>,
    uid: String,
}

impl Age {
    /// The age of the object with metadata `meta`.
    pub fn of(meta: &ObjectMeta) -> Self {
        let created = meta.creation_timestamp.as_ref().map(|t| t.0);
        Self {
            unknown: created.is_none(),
            created,
            uid: meta.uid.clone().unwrap_or_default(),
        }
    }

    /// The age of a claim known only from the maps (a service adopted from an earlier run
    /// that is now rejected): after every known one.
    pub fn unknown() -> Self {
        Self {
            unknown: true,
            ..Self::default()
        }
    }
}

/// Whether the object with metadata `meta` carries `label`.
pub fn has_label(meta: &ObjectMeta, label: &str) -> bool {
    meta.labels.as_ref().is_some_and(|l| l.contains_key(label))
}
