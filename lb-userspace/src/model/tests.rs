use std::collections::BTreeSet;

use ipnet::IpNet;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::Backend;

use super::{desired::*, endpoints::NodeInfo, explain::*, slice::*, validate::*};
use crate::k8s::object::*;
use crate::{
    addr::{frontend_string, to_socket_addr},
    testutil::{self, Ep, Port, ready},
};

const LIMITS: Limits = Limits {
    max_backends_per_service: 4,
    max_frontends_per_service: 4096,
    max_table_size: 251,
    entries_per_backend: 100,
};

/// [`super::desired`] of the slices as the store keeps them.
fn desired<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    node: &NodeInfo,
    limits: &Limits,
) -> Result<Desired, Rejection> {
    let kept: Vec<Slice> = slices.into_iter().map(Slice::new).collect();
    super::desired(svc, &kept, node, limits)
}

fn service(ips: &[&str], ports: &[Port<'_>]) -> Service {
    testutil::service("prod", "web", ips, ports)
}

fn node() -> NodeInfo {
    NodeInfo {
        name: Some("n1".into()),
        zone: Some("a".into()),
        addresses: vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        ..NodeInfo::default()
    }
}

fn slice(family: &str, ports: &[Port<'_>], eps: &[Ep<'_>]) -> EndpointSlice {
    testutil::slice("prod", "web-abc", "web", family, ports, eps)
}

/// Frontends as strings: "VIP:port/PROTO -> [backends]".
fn render(d: &Desired) -> Vec<String> {
    d.frontends
        .iter()
        .map(|f| {
            let bs: Vec<String> = f
                .backends
                .iter()
                .map(|b| to_socket_addr(b).to_string())
                .collect();
            format!("{} -> [{}]", frontend_string(&f.key), bs.join(" "))
        })
        .collect()
}

/// A service of `type_` with node ports: (name, port, protocol, node port).
fn exposed(type_: &str, ips: &[&str], ports: &[(&str, i32, &str, i32)]) -> Service {
    let plain: Vec<Port<'_>> = ports
        .iter()
        .map(|(n, p, proto, _)| (*n, *p, *proto))
        .collect();
    let mut svc = service(ips, &plain);
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some(type_.into());
    for (p, (_, _, _, node_port)) in spec.ports.as_mut().unwrap().iter_mut().zip(ports) {
        p.node_port = Some(*node_port);
    }
    svc
}

fn with_ingress(mut svc: Service, ips: &[(&str, Option<&str>)]) -> Service {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(
                ips.iter()
                    .map(|(ip, mode)| LoadBalancerIngress {
                        ip: Some(ip.to_string()),
                        ip_mode: mode.map(str::to_string),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }),
        ..Default::default()
    });
    svc
}

fn on(ep: Ep<'_>, node: &str) -> EndpointSlice {
    let mut s = slice("IPv4", &[("http", 8080, "TCP")], &[ep]);
    s.endpoints.as_mut().unwrap()[0].node_name = Some(node.into());
    s
}

/// North-south groups as strings: "port/family policy [frontends] -> [backends] ranges".
fn render_external(d: &Desired) -> Vec<String> {
    d.external
        .iter()
        .map(|g| {
            let fs: Vec<String> = g
                .frontends
                .iter()
                .map(|f| format!("{}({:?})", frontend_string(&f.key), f.kind))
                .collect();
            let bs: Vec<String> = g
                .backends
                .iter()
                .map(|b| to_socket_addr(b).to_string())
                .collect();
            let ranges = g.source_ranges.as_ref().map(|r| {
                r.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            });
            format!(
                "{}/{} {} [{}] -> [{}] {:?}",
                g.port_name,
                if g.ipv6 { "v6" } else { "v4" },
                if g.local { "Local" } else { "Cluster" },
                fs.join(" "),
                bs.join(" "),
                ranges
            )
        })
        .collect()
}

#[test]
fn node_ports_are_served_on_every_node_address_of_the_family() {
    let svc = exposed(
        "NodePort",
        &["10.96.0.10", "fd00::10"],
        &[("http", 80, "TCP", 30080)],
    );
    let s4 = slice("IPv4", &[("http", 8080, "TCP")], &[ready("10.0.0.1")]);
    let s6 = slice("IPv6", &[("http", 8080, "TCP")], &[ready("fd00:1::1")]);
    let d = desired(&svc, [&s4, &s6], &node(), &LIMITS).unwrap();
    assert_eq!(
        render_external(&d),
        [
            "http/v4 Cluster [192.0.2.1:30080/TCP(NodePort)] -> [10.0.0.1:8080] None",
            "http/v6 Cluster [[2001:db8::1]:30080/TCP(NodePort)] -> [[fd00:1::1]:8080] None",
        ]
    );
    // Processes on the node reach the node ports through the socket hooks.
    let r = render(&d);
    assert!(
        r.contains(&"192.0.2.1:30080/TCP -> [10.0.0.1:8080]".to_string()),
        "{r:?}"
    );
    // A ClusterIP service's nodePort fields (left over from a type change) serve nothing.
    let mut clusterip = svc.clone();
    clusterip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
    let d = desired(&clusterip, [&s4], &node(), &LIMITS).unwrap();
    assert!(d.external.is_empty());
    // Without node addresses, there are no node-port frontends.
    let d = desired(&svc, [&s4], &NodeInfo::default(), &LIMITS).unwrap();
    assert!(d.external.is_empty());
}

#[test]
fn load_balancer_ips_and_external_ips_share_a_group_per_port_and_family() {
    let mut svc = with_ingress(
        exposed(
            "LoadBalancer",
            &["10.96.0.10"],
            &[("http", 80, "TCP", 30080)],
        ),
        &[
            ("198.51.100.10", None),
            ("198.51.100.11", Some("Proxy")),
            ("bogus", None),
        ],
    );
    svc.spec.as_mut().unwrap().external_ips = Some(vec!["203.0.113.5".into()]);
    let s = slice(
        "IPv4",
        &[("http", 8080, "TCP")],
        &[ready("10.0.0.1"), ready("10.0.0.2")],
    );
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(
        render_external(&d),
        [
            "http/v4 Cluster [192.0.2.1:30080/TCP(NodePort) 203.0.113.5:80/TCP(ExternalIp) \
          198.51.100.10:80/TCP(LoadBalancer)] -> [10.0.0.1:8080 10.0.0.2:8080] None"
        ]
    );
    // The Proxy-mode ingress is left to its load balancer; the bad one is noted.
    assert!(d.notes.iter().any(|n| n.contains("bogus")), "{:?}", d.notes);
    let r = render(&d);
    assert!(!r.iter().any(|f| f.starts_with("198.51.100.11")), "{r:?}");
}

#[test]
fn external_traffic_policy_local_keeps_this_nodes_endpoints() {
    let mut svc = with_ingress(
        exposed(
            "LoadBalancer",
            &["10.96.0.10"],
            &[("http", 80, "TCP", 30080)],
        ),
        &[("198.51.100.10", None)],
    );
    let spec = svc.spec.as_mut().unwrap();
    spec.external_traffic_policy = Some("Local".into());
    spec.health_check_node_port = Some(32000);
    let here = on(ready("10.0.0.1"), "n1");
    let there = on(ready("10.0.0.2"), "n2");
    let d = desired(&svc, [&here, &there], &node(), &LIMITS).unwrap();
    assert_eq!(
        render_external(&d),
        [
            "http/v4 Local [192.0.2.1:30080/TCP(NodePort) 198.51.100.10:80/TCP(LoadBalancer)] \
          -> [10.0.0.1:8080] None"
        ]
    );
    assert_eq!(
        d.health_check,
        Some(HealthCheck {
            port: 32000,
            local_endpoints: 1
        })
    );
    // Connections from the node itself still reach every endpoint (the internal
    // policy is Cluster), as with kube-proxy.
    let r = render(&d);
    assert!(
        r.contains(&"198.51.100.10:80/TCP -> [10.0.0.1:8080 10.0.0.2:8080]".to_string()),
        "{r:?}"
    );
    // No local endpoint: the group stays, without backends (XDP drops), and the health
    // check reports none.
    let d = desired(&svc, [&there], &node(), &LIMITS).unwrap();
    assert!(d.external[0].backends.is_empty() && d.external[0].local);
    assert_eq!(d.health_check.unwrap().local_endpoints, 0);
    // The health check port belongs to LoadBalancer services with the Local policy only.
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
    assert_eq!(
        desired(&svc, [&here], &node(), &LIMITS)
            .unwrap()
            .health_check,
        None
    );
}

#[test]
fn health_checks_count_local_pods_once_whatever_their_ports() {
    let mut svc = exposed(
        "LoadBalancer",
        &["10.96.0.10"],
        &[("http", 80, "TCP", 30080), ("dns", 53, "UDP", 30053)],
    );
    let spec = svc.spec.as_mut().unwrap();
    spec.external_traffic_policy = Some("Local".into());
    spec.health_check_node_port = Some(32000);
    let mut s = slice(
        "IPv4",
        &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
        &[
            ready("10.0.0.1"),
            ready("10.0.0.2"),
            ("10.0.0.3", Some(false), Some(false), Some(false)),
        ],
    );
    for ep in s.endpoints.as_mut().unwrap() {
        ep.node_name = Some("n1".into());
    }
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(d.health_check.unwrap().local_endpoints, 2);
}

#[test]
fn source_ranges_apply_per_family_and_fail_closed() {
    let mut svc = with_ingress(
        exposed(
            "LoadBalancer",
            &["10.96.0.10", "fd00::10"],
            &[("http", 80, "TCP", 30080)],
        ),
        &[("198.51.100.10", None), ("2001:db8:100::10", None)],
    );
    svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec![
        "203.0.113.0/24".into(),
        "2001:db8:9::/48".into(),
        "10.1.2.3/8".into(),
    ]);
    let s4 = slice("IPv4", &[("http", 8080, "TCP")], &[ready("10.0.0.1")]);
    let s6 = slice("IPv6", &[("http", 8080, "TCP")], &[ready("fd00:1::1")]);
    let d = desired(&svc, [&s4, &s6], &node(), &LIMITS).unwrap();
    let ranges: Vec<_> = d
        .external
        .iter()
        .map(|g| g.source_ranges.clone().unwrap())
        .collect();
    assert_eq!(
        ranges,
        [
            vec![
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "203.0.113.0/24".parse().unwrap()
            ],
            vec!["2001:db8:9::/48".parse().unwrap()],
        ]
    );
    // Only invalid ranges: the service admits no source rather than every source.
    svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["nonsense".into()]);
    let d = desired(&svc, [&s4], &node(), &LIMITS).unwrap();
    assert_eq!(d.external[0].source_ranges, Some(vec![]));
    assert!(d.notes.iter().any(|n| n.contains("nonsense")));
}

#[test]
fn bad_external_fields_are_rejected_or_noted() {
    let mut svc = exposed("NodePort", &["10.96.0.10"], &[("http", 80, "TCP", 70000)]);
    assert!(matches!(
        desired(&svc, [], &node(), &LIMITS),
        Err(Rejection::InvalidPort { port: 70000 })
    ));
    svc = exposed("NodePort", &["10.96.0.10"], &[("http", 80, "TCP", 30080)]);
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Nearest".into());
    assert!(matches!(
        desired(&svc, [], &node(), &LIMITS),
        Err(Rejection::Unsupported {
            field: "externalTrafficPolicy",
            ..
        })
    ));
    svc = exposed(
        "NodePort",
        &["10.96.0.10"],
        &[("a", 80, "TCP", 30080), ("a", 81, "TCP", 30081)],
    );
    assert!(matches!(
        desired(&svc, [], &node(), &LIMITS),
        Err(Rejection::DuplicatePortName(_))
    ));
}

#[test]
fn ports_match_slices_by_name_and_protocol() {
    let svc = service(
        &["10.96.0.10"],
        &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
    );
    let s = slice(
        "IPv4",
        &[("dns", 5353, "UDP"), ("dns-tcp", 5354, "TCP")],
        &[ready("10.0.0.1"), ready("10.0.0.2")],
    );
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(
        render(&d),
        [
            "10.96.0.10:53/UDP -> [10.0.0.1:5353 10.0.0.2:5353]",
            "10.96.0.10:53/TCP -> [10.0.0.1:5354 10.0.0.2:5354]",
        ]
    );
    assert_eq!(d.frontends[0].port_name, "dns");
}

#[test]
fn only_ready_endpoints_while_any_is_ready() {
    let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let s = slice(
        "IPv4",
        &[("", 8080, "TCP")],
        &[
            ready("10.0.0.1"),
            ("10.0.0.2", Some(false), Some(false), Some(false)),
            ("10.0.0.3", Some(false), Some(true), Some(true)),
            // Unset conditions mean ready.
            ("10.0.0.4", None, None, None),
        ],
    );
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(
        render(&d),
        ["10.96.0.1:80/TCP -> [10.0.0.1:8080 10.0.0.4:8080]"]
    );
}

#[test]
fn serving_terminating_endpoints_when_none_is_ready() {
    let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let s = slice(
        "IPv4",
        &[("", 8080, "TCP")],
        &[
            ("10.0.0.2", Some(false), Some(false), Some(true)),
            ("10.0.0.3", Some(false), Some(true), Some(true)),
        ],
    );
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.3:8080]"]);
}

#[test]
fn no_usable_endpoint_is_a_frontend_without_backends() {
    let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let s = slice(
        "IPv4",
        &[("", 8080, "TCP")],
        &[("10.0.0.2", Some(false), Some(false), Some(false))],
    );
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> []"]);
    let d = desired(&svc, [], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> []"]);
}

#[test]
fn slices_are_unioned_and_deduplicated() {
    let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let a = slice(
        "IPv4",
        &[("", 8080, "TCP")],
        &[ready("10.0.0.1"), ready("10.0.0.2")],
    );
    let b = slice(
        "IPv4",
        &[("", 8080, "TCP")],
        &[ready("10.0.0.2"), ready("10.0.0.3")],
    );
    let d = desired(&svc, [&a, &b], &node(), &LIMITS).unwrap();
    assert_eq!(
        render(&d),
        ["10.96.0.1:80/TCP -> [10.0.0.1:8080 10.0.0.2:8080 10.0.0.3:8080]"]
    );
}

#[test]
fn dual_stack_uses_each_familys_slices() {
    let svc = service(&["10.96.0.1", "fd00:96::1"], &[("", 80, "TCP")]);
    let v4 = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
    let v6 = slice("IPv6", &[("", 8080, "TCP")], &[ready("fd00:244::1")]);
    let d = desired(&svc, [&v4, &v6], &node(), &LIMITS).unwrap();
    assert_eq!(
        render(&d),
        [
            "10.96.0.1:80/TCP -> [10.0.0.1:8080]",
            "[fd00:96::1]:80/TCP -> [[fd00:244::1]:8080]",
        ]
    );
}

#[test]
fn headless_external_name_and_unallocated_have_no_frontends() {
    let mut svc = service(&["None"], &[("", 80, "TCP")]);
    assert_eq!(desired(&svc, [], &node(), &LIMITS).unwrap().frontends, []);
    svc.spec.as_mut().unwrap().cluster_ips = Some(vec![]);
    assert_eq!(desired(&svc, [], &node(), &LIMITS).unwrap().frontends, []);
    let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    svc.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    assert_eq!(desired(&svc, [], &node(), &LIMITS).unwrap().frontends, []);
}

#[test]
fn single_cluster_ip_field_is_used_when_the_list_is_absent() {
    let mut svc = service(&[], &[("", 80, "TCP")]);
    let spec = svc.spec.as_mut().unwrap();
    spec.cluster_ips = None;
    spec.cluster_ip = Some("10.96.0.7".into());
    let d = desired(&svc, [], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.7:80/TCP -> []"]);
}

#[test]
fn invalid_services_are_rejected() {
    let cases: [(Service, &str); 7] = [
        (service(&["10.96.0.300"], &[("", 80, "TCP")]), "invalid_ip"),
        (
            service(&["::ffff:10.0.0.1"], &[("", 80, "TCP")]),
            "invalid_ip",
        ),
        (
            service(&["10.0.0.1", "10.0.0.2"], &[("", 80, "TCP")]),
            "duplicate_family",
        ),
        (
            service(&["10.96.0.1"], &[("", 70000, "TCP")]),
            "invalid_port",
        ),
        (service(&["10.96.0.1"], &[("", 0, "TCP")]), "invalid_port"),
        (
            service(&["10.96.0.1"], &[("", 80, "QUIC")]),
            "unknown_protocol",
        ),
        (
            service(&["10.96.0.1"], &[("a", 80, "TCP"), ("b", 80, "TCP")]),
            "duplicate_port",
        ),
    ];
    for (svc, reason) in cases {
        let err = desired(&svc, [], &node(), &LIMITS).unwrap_err();
        assert_eq!(err.reason(), reason, "{err}");
        // `lbctl explain` refuses it for the same reason.
        let err = explain(&svc, [], &node()).unwrap_err();
        assert_eq!(err.reason(), reason, "explain: {err}");
    }
    // Several flaws: both name the first in the same fixed order.
    let mut svc = service(&["10.96.0.1"], &[("", 0, "TCP")]);
    svc.spec.as_mut().unwrap().external_ips = Some(vec!["not-an-ip".into()]);
    let a = desired(&svc, [], &node(), &LIMITS).unwrap_err();
    let b = explain(&svc, [], &node()).unwrap_err();
    assert_eq!((a.reason(), b.reason()), ("invalid_ip", "invalid_ip"));
}

#[test]
fn a_service_over_the_frontend_limit_is_rejected() {
    // 2 ports x (a cluster IP, 3 external IPs): 8 socket frontends, 6 north-south ones.
    let mut svc = service(&["10.96.0.1"], &[("a", 80, "TCP"), ("b", 81, "TCP")]);
    svc.spec.as_mut().unwrap().external_ips = Some(
        ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
            .map(String::from)
            .to_vec(),
    );
    let at = |max| Limits {
        max_frontends_per_service: max,
        ..LIMITS
    };
    assert!(desired(&svc, [], &node(), &at(14)).is_ok());
    let err = desired(&svc, [], &node(), &at(13)).unwrap_err();
    assert_eq!(err.reason(), "too_many_frontends");
    assert!(err.to_string().starts_with("14 frontends"), "{err}");
}

#[test]
fn a_port_over_the_backend_limit_is_served_by_a_stable_subset() {
    let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let of = |ids: &[u8]| -> Desired {
        let eps: Vec<String> = ids.iter().map(|i| format!("10.0.0.{i}")).collect();
        let eps: Vec<Ep<'_>> = eps.iter().map(|a| ready(a)).collect();
        let s = slice("IPv4", &[("", 8080, "TCP")], &eps);
        desired(&svc, [&s], &node(), &LIMITS).unwrap()
    };
    let served =
        |d: &Desired| -> BTreeSet<Backend> { d.frontends[0].backends.iter().copied().collect() };
    let d = of(&[1, 2, 3, 4, 5, 6]);
    assert_eq!(d.frontends[0].backends.len(), 4, "the limit");
    assert_eq!(d.limited.len(), 1, "{:?}", d.limited);
    assert!(
        d.limited[0].contains("6 endpoints, over the limit of 4"),
        "{:?}",
        d.limited
    );
    // In any order, the same subset; a pod replaced changes it by one at most.
    assert_eq!(served(&of(&[6, 5, 4, 3, 2, 1])), served(&d));
    let gone = *served(&d).iter().next().unwrap();
    let gone_last = gone.addr.octets()[15];
    let rest: Vec<u8> = (1..=6).filter(|i| *i != gone_last).chain([7]).collect();
    let after = served(&of(&rest));
    assert_eq!(after.len(), 4);
    assert_eq!(
        served(&d).difference(&after).count(),
        1,
        "{d:?} -> {after:?}"
    );
    // Under the limit: every endpoint, no warning.
    let d = of(&[1, 2]);
    assert_eq!(d.frontends[0].backends.len(), 2);
    assert!(d.limited.is_empty());
}

#[test]
fn sctp_ports_are_skipped_with_a_note() {
    let svc = service(&["10.96.0.1"], &[("a", 80, "TCP"), ("b", 90, "SCTP")]);
    let d = desired(&svc, [], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> []"]);
    assert_eq!(d.notes.len(), 1, "{:?}", d.notes);
}

#[test]
fn bad_endpoint_addresses_are_skipped_with_a_note() {
    let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let s = slice(
        "IPv4",
        &[("", 8080, "TCP")],
        &[ready("10.0.0.1"), ready("fd00::1"), ready("10.0.0.999")],
    );
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.1:8080]"]);
    assert_eq!(d.notes.len(), 2, "{:?}", d.notes);
}

#[test]
fn long_names_are_rejected() {
    let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    svc.metadata.name = Some("x".repeat(64));
    assert_eq!(
        desired(&svc, [], &node(), &LIMITS).unwrap_err().reason(),
        "name_too_long"
    );
}

#[test]
fn services_of_another_proxy_and_headless_slices_are_ignored() {
    let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let s = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
    let mut headless = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.2")]);
    headless
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(HEADLESS_LABEL.into(), "".into());
    let d = desired(&svc, [&s, &headless], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.1:8080]"]);
    svc.metadata.labels =
        Some([(SERVICE_PROXY_NAME_LABEL.to_string(), "other".to_string())].into());
    assert_eq!(desired(&svc, [&s], &node(), &LIMITS).unwrap().frontends, []);
    let kept = [Slice::new(&s)];
    assert_eq!(explain(&svc, &kept, &node()).unwrap(), []);
}

#[test]
fn external_ips_are_frontends_with_the_same_backends() {
    let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    svc.spec.as_mut().unwrap().external_ips = Some(vec![
        "192.0.2.10".into(),
        "10.96.0.1".into(),
        "2001:db8::10".into(),
    ]);
    let v4 = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
    let v6 = slice("IPv6", &[("", 8080, "TCP")], &[ready("fd00::1")]);
    let d = desired(&svc, [&v4, &v6], &node(), &LIMITS).unwrap();
    assert_eq!(
        render(&d),
        [
            "10.96.0.1:80/TCP -> [10.0.0.1:8080]",
            "192.0.2.10:80/TCP -> [10.0.0.1:8080]",
        ]
    );
    // The IPv6 external IP of a service without an IPv6 cluster IP is not served, as
    // kube-proxy serves a family only for services with a cluster IP of it.
    assert!(
        d.notes.iter().any(|n| n.contains("2001:db8::10")),
        "{:?}",
        d.notes
    );
    svc.spec.as_mut().unwrap().external_ips = Some(vec!["192.0.2.300".into()]);
    let err = desired(&svc, [], &node(), &LIMITS).unwrap_err();
    assert_eq!(
        err.to_string(),
        "external IP \"192.0.2.300\" is not a valid IP address"
    );
}

#[test]
fn external_ips_of_the_node_special_or_outside_the_cidrs_are_refused() {
    let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    svc.spec.as_mut().unwrap().external_ips = Some(
        [
            "192.0.2.1",   // serves node ports
            "10.1.2.3",    // another address of the node
            "127.0.0.1",   // loopback
            "169.254.1.1", // link-local
            "198.51.100.7",
            "203.0.113.9",
        ]
        .map(String::from)
        .to_vec(),
    );
    let mut node = node();
    node.own_addresses = vec!["10.1.2.3".parse().unwrap()];
    node.external_ip_cidrs = vec![
        "203.0.113.0/24".parse().unwrap(),
        "10.0.0.0/8".parse().unwrap(),
    ];
    let s = slice("IPv4", &[("", 8080, "TCP")], &[ready("10.0.0.1")]);
    let d = desired(&svc, [&s], &node, &LIMITS).unwrap();
    assert_eq!(
        render(&d),
        [
            "10.96.0.1:80/TCP -> [10.0.0.1:8080]",
            "203.0.113.9:80/TCP -> [10.0.0.1:8080]",
        ]
    );
    assert_eq!(
        d.refused,
        [
            "external IP 192.0.2.1 is not honoured: it is an address of this node",
            "external IP 10.1.2.3 is not honoured: it is an address of this node",
            "external IP 127.0.0.1 is not honoured: a loopback, link-local or multicast address",
            "external IP 169.254.1.1 is not honoured: a loopback, link-local or multicast address",
            "external IP 198.51.100.7 is not honoured: outside the agent's --external-ip-cidrs",
        ]
    );
    // The cluster IP is the service's own; the external IP is borrowed (see `Claim`).
    let borrowed: Vec<bool> = d.frontends.iter().map(|f| f.claim.borrowed).collect();
    assert_eq!(borrowed, [false, true]);
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints() {
    let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
    let mut s = slice(
        "IPv4",
        &[("", 8080, "TCP")],
        &[ready("10.0.0.1"), ready("10.0.0.2")],
    );
    s.endpoints.as_mut().unwrap()[1].node_name = Some("n1".into());
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.2:8080]"]);
    // Without a node name nothing is local, and the notes say why.
    let d = desired(&svc, [&s], &NodeInfo::default(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> []"]);
    assert!(d.notes[0].contains("--node-name"), "{:?}", d.notes);
    svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Nearby".into());
    assert_eq!(
        desired(&svc, [&s], &node(), &LIMITS).unwrap_err().reason(),
        "unsupported_value"
    );
}

#[test]
fn traffic_from_this_node_to_external_addresses_gets_cluster_endpoints() {
    // kube-proxy's short circuit: whatever both policies say, this node's pods and
    // processes reach a service's node port and external addresses through
    // cluster-wide endpoints; from outside, eTP Local holds them to this node's.
    // (internal, external, local endpoint?) -> (cluster IP, node port from the node,
    // from outside)
    let cases = [
        (
            ("Cluster", "Local", true),
            (
                "[10.0.0.1:8080 10.0.0.2:8080]",
                "[10.0.0.1:8080 10.0.0.2:8080]",
                1,
            ),
        ),
        (
            ("Local", "Local", true),
            ("[10.0.0.2:8080]", "[10.0.0.1:8080 10.0.0.2:8080]", 1),
        ),
        (
            ("Local", "Local", false),
            ("[]", "[10.0.0.1:8080 10.0.0.2:8080]", 0),
        ),
        (
            ("Local", "Cluster", false),
            ("[]", "[10.0.0.1:8080 10.0.0.2:8080]", 2),
        ),
    ];
    for ((internal, external, local), (cluster, node_port, outside)) in cases {
        let mut svc = exposed("NodePort", &["10.96.0.1"], &[("http", 80, "TCP", 30080)]);
        let spec = svc.spec.as_mut().unwrap();
        spec.internal_traffic_policy = Some(internal.into());
        spec.external_traffic_policy = Some(external.into());
        spec.external_ips = Some(vec!["203.0.113.5".into()]);
        let mut s = slice(
            "IPv4",
            &[("http", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.2")],
        );
        s.endpoints.as_mut().unwrap()[1].node_name = Some(if local { "n1" } else { "n2" }.into());
        let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
        let case = format!("iTP {internal}, eTP {external}, local {local}");
        let of = |frontend: &str| -> String {
            render(&d)
                .into_iter()
                .find_map(|r| r.strip_prefix(&format!("{frontend} -> ")).map(String::from))
                .unwrap_or_else(|| panic!("{case}: no {frontend}"))
        };
        assert_eq!(of("10.96.0.1:80/TCP"), cluster, "{case}");
        assert_eq!(of("192.0.2.1:30080/TCP"), node_port, "{case}");
        assert_eq!(of("203.0.113.5:80/TCP"), node_port, "{case}");
        assert_eq!(d.external[0].backends.len(), outside, "{case}");
    }
}

#[test]
fn explain_gives_every_endpoint_a_verdict_per_path_that_agrees_with_desired() {
    let mut svc = exposed("NodePort", &["10.96.0.1"], &[("http", 80, "TCP", 30080)]);
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    let mut s = slice(
        "IPv4",
        &[("http", 8080, "TCP")],
        &[
            ready("10.0.0.1"),
            ready("10.0.0.2"),
            ("10.0.0.3", Some(false), Some(false), Some(false)),
        ],
    );
    s.endpoints.as_mut().unwrap()[1].node_name = Some("n1".into());
    let kept = [Slice::new(&s)];
    let ports = explain(&svc, &kept, &node()).unwrap();
    assert_eq!(ports.len(), 1);
    let p = &ports[0];
    assert_eq!(
        (
            p.port_name.as_str(),
            p.family.as_str(),
            p.external_policy.as_str()
        ),
        ("http", "IPv4", "Local")
    );
    let table: Vec<(String, bool, bool)> = p
        .endpoints
        .iter()
        .map(|e| {
            (
                e.address.to_string(),
                e.cluster_ip.eligible,
                e.external.eligible,
            )
        })
        .collect();
    assert_eq!(
        table,
        [
            ("10.0.0.1:8080".to_string(), true, false),
            ("10.0.0.2:8080".to_string(), true, true),
            ("10.0.0.3:8080".to_string(), false, false),
        ]
    );
    assert!(
        p.endpoints[0]
            .external
            .why
            .contains("traffic policy is Local")
    );
    assert_eq!(p.endpoints[2].cluster_ip.why, "not ready");
    // The same endpoints as the programmed frontends have.
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    // (The node port from this node's own processes gets cluster-wide endpoints, as
    // kube-proxy gives them.)
    assert_eq!(
        render(&d)[0],
        "10.96.0.1:80/TCP -> [10.0.0.1:8080 10.0.0.2:8080]"
    );
    assert_eq!(d.external[0].backends.len(), 1);
}

#[test]
fn zone_hints_steer_to_this_zone() {
    use k8s_openapi::api::discovery::v1::{EndpointHints, ForZone};
    let svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let mut s = slice(
        "IPv4",
        &[("", 8080, "TCP")],
        &[ready("10.0.0.1"), ready("10.0.0.2")],
    );
    for (ep, zone) in s.endpoints.as_mut().unwrap().iter_mut().zip(["a", "b"]) {
        ep.hints = Some(EndpointHints {
            for_zones: Some(vec![ForZone { name: zone.into() }]),
            for_nodes: None,
        });
    }
    let d = desired(&svc, [&s], &node(), &LIMITS).unwrap();
    assert_eq!(render(&d), ["10.96.0.1:80/TCP -> [10.0.0.1:8080]"]);
}

#[test]
fn session_affinity_timeouts() {
    use k8s_openapi::api::core::v1::{ClientIPConfig, SessionAffinityConfig};
    let mut svc = service(&["10.96.0.1"], &[("", 80, "TCP")]);
    let timeout = |svc: &Service| {
        desired(svc, [], &node(), &LIMITS).map(|d| d.frontends[0].affinity_timeout_s)
    };
    assert_eq!(timeout(&svc), Ok(0));
    let spec = svc.spec.as_mut().unwrap();
    spec.session_affinity = Some("ClientIP".into());
    assert_eq!(timeout(&svc), Ok(DEFAULT_AFFINITY_TIMEOUT_S));
    for (t, ok) in [
        (60, true),
        (86_400, true),
        (0, false),
        (86_401, false),
        (-1, false),
    ] {
        svc.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
            client_ip: Some(ClientIPConfig {
                timeout_seconds: Some(t),
            }),
        });
        assert_eq!(timeout(&svc).is_ok(), ok, "timeout {t}");
    }
    svc.spec.as_mut().unwrap().session_affinity = Some("Cookie".into());
    assert!(timeout(&svc).is_err());
}

#[test]
fn node_info_reads_the_zone_label() {
    let labels = [(ZONE_LABEL.to_string(), "z1".to_string())].into();
    assert_eq!(
        node_info(Some("n1"), Some(&labels)).zone.as_deref(),
        Some("z1")
    );
    let empty = [(ZONE_LABEL.to_string(), String::new())].into();
    assert_eq!(node_info(Some("n1"), Some(&empty)).zone, None);
}

#[test]
fn slice_owner_comes_from_the_label() {
    let s = slice("IPv4", &[], &[]);
    assert_eq!(
        ObjectRef::owner_of_slice(&s),
        Some(ObjectRef::new("prod", "web"))
    );
}
