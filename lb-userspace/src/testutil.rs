//! Builders of Kubernetes objects for unit tests.

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::k8s::object::SERVICE_NAME_LABEL;

/// The backend at `addr` ("ip:port"), where it runs unknown.
pub fn backend(addr: &str) -> lb_common::Backend {
    let ep = crate::addr::to_endpoint(addr.parse().expect("an address and port"));
    lb_common::Backend::new(ep, lb_common::node::UNKNOWN)
}

/// A port: (name, number, protocol).
pub type Port<'a> = (&'a str, i32, &'a str);
/// An endpoint: (address, ready, serving, terminating).
pub type Ep<'a> = (&'a str, Option<bool>, Option<bool>, Option<bool>);

fn meta(ns: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

/// A ClusterIP service.
pub fn service(ns: &str, name: &str, ips: &[&str], ports: &[Port<'_>]) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            cluster_ips: Some(ips.iter().map(std::string::ToString::to_string).collect()),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, proto)| ServicePort {
                        name: Some(name.to_string()),
                        port: *port,
                        protocol: Some(proto.to_string()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An EndpointSlice of `service`.
pub fn slice(
    ns: &str,
    name: &str,
    service: &str,
    family: &str,
    ports: &[Port<'_>],
    eps: &[Ep<'_>],
) -> EndpointSlice {
    let mut metadata = meta(ns, name);
    metadata.labels = Some([(SERVICE_NAME_LABEL.to_string(), service.to_string())].into());
    EndpointSlice {
        metadata,
        address_type: family.into(),
        ports: Some(
            ports
                .iter()
                .map(|(name, port, proto)| EndpointPort {
                    name: Some(name.to_string()),
                    port: Some(*port),
                    protocol: Some(proto.to_string()),
                    ..Default::default()
                })
                .collect(),
        ),
        endpoints: Some(
            eps.iter()
                .map(|(addr, ready, serving, terminating)| Endpoint {
                    addresses: vec![addr.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: *serving,
                        terminating: *terminating,
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// A ready endpoint.
pub fn ready(addr: &str) -> Ep<'_> {
    (addr, Some(true), Some(true), Some(false))
}
