//! Service and EndpointSlice manifests for the file source.

use serde_json::{Value, json};

/// A service port or slice port: (name, number, protocol). The number is wide so tests can
/// write invalid ones.
pub type Port<'a> = (&'a str, i64, &'a str);

fn ports(ports: &[Port<'_>], number_key: &str) -> Value {
    ports
        .iter()
        .map(|(name, port, protocol)| json!({"name": name, number_key: port, "protocol": protocol}))
        .collect()
}

/// A ClusterIP Service.
pub fn service(ns: &str, name: &str, cluster_ips: &[&str], service_ports: &[Port<'_>]) -> String {
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": cluster_ips.first(),
            "clusterIPs": cluster_ips,
            "ports": ports(service_ports, "port"),
        },
    });
    serde_json::to_string_pretty(&doc).expect("serializes")
}

/// An EndpointSlice of `service` with `(address, ready)` endpoints.
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    family: &str,
    slice_ports: &[Port<'_>],
    endpoints: &[(String, bool)],
) -> String {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(addr, ready)| json!({"addresses": [addr], "conditions": {"ready": ready}}))
        .collect();
    let doc = json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": family,
        "ports": ports(slice_ports, "port"),
        "endpoints": eps,
    });
    serde_json::to_string_pretty(&doc).expect("serializes")
}

/// Several documents in one manifest.
pub fn documents(docs: &[String]) -> String {
    docs.join("\n---\n")
}
