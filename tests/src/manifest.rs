//! Service, EndpointSlice and Node manifests, for the file source and the API fixture.
//! JSON documents (JSON is YAML), joined by `---`.

use serde_json::{Value, json};

/// A service port or slice port: (name, number, protocol). The number is wide so tests can
/// write invalid ones.
pub type Port<'a> = (&'a str, i64, &'a str);

fn ports(ports: &[Port<'_>]) -> Value {
    ports
        .iter()
        .map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}))
        .collect()
}

fn text(doc: &Value) -> String {
    serde_json::to_string_pretty(doc).expect("serializes")
}

/// A Service under construction.
#[derive(Clone, Debug)]
pub struct Svc(Value);

impl Svc {
    /// A ClusterIP service with these cluster IPs and ports.
    pub fn new(ns: &str, name: &str, cluster_ips: &[&str], service_ports: &[Port<'_>]) -> Self {
        Self(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "clusterIP": cluster_ips.first(),
                "clusterIPs": cluster_ips,
                "ports": ports(service_ports),
            },
        }))
    }

    /// Sets a field of the spec.
    pub fn spec(mut self, field: &str, value: Value) -> Self {
        self.0["spec"][field] = value;
        self
    }

    /// Sets its creation time (RFC 3339) and UID, as the API server does.
    pub fn created(mut self, at: &str, uid: &str) -> Self {
        self.0["metadata"]["creationTimestamp"] = json!(at);
        self.0["metadata"]["uid"] = json!(uid);
        self
    }

    /// Sets a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0["metadata"]["labels"][key] = json!(value);
        self
    }

    /// The manifest.
    pub fn yaml(&self) -> String {
        text(&self.0)
    }
}

/// A ClusterIP Service.
pub fn service(ns: &str, name: &str, cluster_ips: &[&str], service_ports: &[Port<'_>]) -> String {
    Svc::new(ns, name, cluster_ips, service_ports).yaml()
}

/// An endpoint of an EndpointSlice.
#[derive(Clone, Debug)]
pub struct Ep(Value);

impl Ep {
    /// A ready endpoint.
    pub fn ready(addr: impl ToString) -> Self {
        Self::with(addr, true, true, false)
    }

    /// An endpoint that is not ready (and not serving).
    pub fn not_ready(addr: impl ToString) -> Self {
        Self::with(addr, false, false, false)
    }

    /// An endpoint of a terminating pod that still serves.
    pub fn terminating(addr: impl ToString) -> Self {
        Self::with(addr, false, true, true)
    }

    fn with(addr: impl ToString, ready: bool, serving: bool, terminating: bool) -> Self {
        Self(json!({
            "addresses": [addr.to_string()],
            "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        }))
    }

    /// Places it on a node.
    pub fn on_node(mut self, node: &str) -> Self {
        self.0["nodeName"] = json!(node);
        self
    }

    /// Hints it for zones.
    pub fn for_zones(mut self, zones: &[&str]) -> Self {
        let z: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
        self.0["hints"]["forZones"] = json!(z);
        self
    }
}

/// An EndpointSlice of `service`.
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    family: &str,
    slice_ports: &[Port<'_>],
    endpoints: &[Ep],
) -> String {
    let eps: Vec<&Value> = endpoints.iter().map(|e| &e.0).collect();
    text(&json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "ports": ports(slice_ports),
        "endpoints": eps,
    }))
}

/// A Node with a zone label.
pub fn node(name: &str, zone: &str) -> String {
    text(&json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
    }))
}

/// Several documents in one manifest.
pub fn documents(docs: &[String]) -> String {
    docs.join("\n---\n")
}
