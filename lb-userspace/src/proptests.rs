//! Property tests of everything that reads objects from the outside: manifest parsing, the
//! store, the model and the reconciler, on random and hostile Services and EndpointSlices
//! (invalid and wrong-family IPs, out-of-range ports, unknown protocols and types, duplicate
//! ports and endpoints, many slices for one service, slices of no service).
//!
//! The properties: nothing panics; the maps stay consistent after every write (the fake
//! datapath checks each one); and a valid service next to hostile objects is programmed
//! exactly as when it is alone, also when the hostile ones fill the maps.
//!
//! `PROPTEST_CASES` sets the number of cases (`cargo xtask fuzz` runs many more).

use k8s_openapi::{
    api::{
        core::v1::{
            ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort,
            ServiceSpec, ServiceStatus, SessionAffinityConfig,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use proptest::{collection::vec, option, prelude::*};

use crate::{
    addr::{frontend_string, to_socket_addr},
    datapath::{Capacities, Contents, fake::FakeDatapath},
    k8s::object::SERVICE_NAME_LABEL,
    k8s::source::file::parse_manifest,
    k8s::store::{Snapshot, Store, Update},
    model::Limits,
    reconcile::Reconciler,
    testutil,
};

const LIMITS: Limits = Limits {
    max_backends_per_service: 16,
    max_frontends_per_service: 4096,
    max_table_size: 61,
    entries_per_backend: 10,
};

fn caps(scale: u32) -> Capacities {
    Capacities {
        services: 4 * scale,
        slots: 16 * scale,
        backends: 8 * scale,
        affinity_match: 16 * scale,
        external: 4 * scale,
        external_ids: 2 * scale,
        table_entries: 2 * scale * 61,
        ranges: 2 * scale,
        external_match: 8 * scale,
    }
}

/// Address text: valid IPv4 and IPv6 from small pools (so objects collide), and garbage.
fn ip() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0u8..6).prop_map(|i| format!("10.96.0.{i}")),
        4 => (0u8..6).prop_map(|i| format!("fd00::{i}")),
        6 => (0u8..8).prop_map(|i| format!("10.244.0.{i}")),
        2 => (0u8..4).prop_map(|i| format!("fd00:244::{i}")),
        1 => prop::sample::select(vec![
            "", "None", "0.0.0.0", "::", "255.255.255.255", "300.1.1.1", "::ffff:10.96.0.1",
            "10.96.0.1 ", "10.96.0.1/32", "fe80::1%eth0", "224.0.0.1", "127.0.0.1",
        ])
        .prop_map(String::from),
        1 => ".{0,24}",
    ]
}

/// Strings from a small pool (names that collide) or anything.
fn word(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![
        12 => prop::sample::select(pool).prop_map(String::from),
        1 => ".{0,12}",
    ]
}

fn port_number() -> impl Strategy<Value = i32> {
    prop_oneof![
        16 => prop::sample::select(vec![53, 80, 443, 8080]),
        1 => prop::sample::select(vec![-1, 0, 1, 65535, 65536, i32::MAX, i32::MIN]),
        1 => any::<i32>(),
    ]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    option::weighted(0.9, word(&["TCP", "UDP", "TCP", "UDP", "SCTP"]))
}

fn service_port() -> impl Strategy<Value = ServicePort> {
    (
        option::weighted(0.9, word(&["http", "dns"])),
        port_number(),
        protocol(),
        option::of(port_number()),
        option::of(prop_oneof![
            port_number().prop_map(IntOrString::Int),
            word(&["http", "dns"]).prop_map(IntOrString::String),
        ]),
    )
        .prop_map(
            |(name, port, protocol, node_port, target_port)| ServicePort {
                name,
                port,
                protocol,
                node_port,
                target_port,
                ..ServicePort::default()
            },
        )
}

fn meta(
    namespaces: &'static [&'static str],
    names: &'static [&'static str],
) -> impl Strategy<Value = ObjectMeta> {
    (
        option::weighted(0.97, word(namespaces)),
        option::weighted(0.97, word(names)),
    )
        .prop_map(|(namespace, name)| ObjectMeta {
            namespace,
            name,
            ..ObjectMeta::default()
        })
}

fn hostile_service() -> impl Strategy<Value = Service> {
    let spec = (
        option::weighted(
            0.7,
            word(&[
                "ClusterIP",
                "NodePort",
                "LoadBalancer",
                "ClusterIP",
                "ExternalName",
            ]),
        ),
        // Mostly one cluster IP (two of one family are rejected) and one port.
        option::weighted(
            0.95,
            prop_oneof![6 => vec(ip(), 1..2), 1 => vec(ip(), 0..3)],
        ),
        option::of(ip()),
        option::weighted(
            0.95,
            prop_oneof![6 => vec(service_port(), 1..2), 1 => vec(service_port(), 0..4)],
        ),
        option::of(vec(ip(), 0..3)),
        option::of(word(&["None", "ClientIP"])),
        option::of(prop_oneof![4 => 1..86_400i32, 1 => any::<i32>()]),
        option::of(word(&["Cluster", "Local"])),
        option::of(word(&["Cluster", "Local"])),
        option::of(vec(
            word(&["10.0.0.0/8", "0.0.0.0/0", "::/0", "10.0.0.1"]),
            0..3,
        )),
        option::of(port_number()),
        option::of(vec(word(&["IPv4", "IPv6"]), 0..3)),
    );
    (
        meta(&["a", "b"], &["s0", "s1", "s2"]),
        spec,
        option::of(vec(ip(), 0..3)),
    )
        .prop_map(|(metadata, spec, ingress)| {
            let (type_, cluster_ips, cluster_ip, ports, external_ips, affinity, timeout) =
                (spec.0, spec.1, spec.2, spec.3, spec.4, spec.5, spec.6);
            Service {
                metadata,
                spec: Some(ServiceSpec {
                    type_,
                    cluster_ips,
                    cluster_ip,
                    ports,
                    external_ips,
                    session_affinity: affinity,
                    session_affinity_config: timeout.map(|t| SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(t),
                        }),
                    }),
                    external_traffic_policy: spec.7,
                    internal_traffic_policy: spec.8,
                    load_balancer_source_ranges: spec.9,
                    health_check_node_port: spec.10,
                    ip_families: spec.11,
                    ..ServiceSpec::default()
                }),
                status: ingress.map(|ips| ServiceStatus {
                    load_balancer: Some(LoadBalancerStatus {
                        ingress: Some(
                            ips.into_iter()
                                .map(|ip| LoadBalancerIngress {
                                    ip: Some(ip),
                                    ..LoadBalancerIngress::default()
                                })
                                .collect(),
                        ),
                    }),
                    ..ServiceStatus::default()
                }),
            }
        })
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (
        vec(ip(), 1..3),
        option::weighted(
            0.8,
            (
                option::weighted(0.9, prop::bool::weighted(0.8)),
                option::of(any::<bool>()),
                option::of(prop::bool::weighted(0.2)),
            ),
        ),
        option::of(word(&["n1", "n2"])),
        option::of(word(&["z1", "z2"])),
    )
        .prop_map(|(addresses, conditions, node_name, zone)| Endpoint {
            addresses,
            conditions: conditions.map(|(ready, serving, terminating)| EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            node_name,
            zone,
            ..Endpoint::default()
        })
}

fn hostile_slice() -> impl Strategy<Value = EndpointSlice> {
    (
        meta(&["a", "b"], &["e0", "e1", "e2", "e3"]),
        option::weighted(0.95, word(&["s0", "s1", "s2"])),
        word(&["IPv4", "IPv4", "IPv6", "FQDN"]),
        option::weighted(
            0.95,
            vec(
                (
                    option::weighted(0.9, word(&["http", "dns"])),
                    option::weighted(0.95, port_number()),
                    protocol(),
                ),
                1..4,
            ),
        ),
        option::weighted(0.95, vec(endpoint(), 1..24)),
    )
        .prop_map(|(mut metadata, service, address_type, ports, endpoints)| {
            metadata.labels =
                service.map(|s| [(SERVICE_NAME_LABEL.to_string(), s)].into_iter().collect());
            EndpointSlice {
                metadata,
                address_type,
                ports: ports.map(|p| {
                    p.into_iter()
                        .map(|(name, port, protocol)| EndpointPort {
                            name,
                            port,
                            protocol,
                            ..EndpointPort::default()
                        })
                        .collect()
                }),
                endpoints,
            }
        })
}

/// A service and a slice of it that mostly fit together (so the interplay of programmed
/// services is exercised: shared cluster IPs and backends, conflicts, full maps), with
/// hostile endpoints mixed in: duplicates, the other family, garbage, any conditions.
fn coherent_pair() -> impl Strategy<Value = (Service, EndpointSlice)> {
    (
        prop::sample::select(vec!["a", "b"]),
        prop::sample::select(vec!["p0", "p1", "p2", "p3"]),
        (0u8..6).prop_map(|i| format!("10.96.1.{i}")),
        prop::sample::select(vec![("http", 80, "TCP"), ("dns", 53, "UDP")]),
        prop::sample::select(vec!["ClusterIP", "NodePort", "LoadBalancer"]),
        vec(
            (
                prop_oneof![
                    8 => (0u8..12).prop_map(|i| format!("10.244.1.{i}")),
                    1 => ip(),
                ],
                option::of(any::<bool>()),
                option::of(any::<bool>()),
                option::of(any::<bool>()),
            ),
            0..12,
        ),
        option::of(word(&["Cluster", "Local"])),
    )
        .prop_map(|(ns, name, cluster_ip, port, type_, eps, policy)| {
            let mut svc = testutil::service(ns, name, &[&cluster_ip], &[port]);
            if let Some(spec) = svc.spec.as_mut() {
                spec.type_ = Some(type_.into());
                spec.external_traffic_policy = policy;
            }
            let eps: Vec<testutil::Ep<'_>> = eps
                .iter()
                .map(|(addr, r, s, t)| (addr.as_str(), *r, *s, *t))
                .collect();
            let (pname, _, proto) = port;
            let slice = testutil::slice(
                ns,
                &format!("{name}-1"),
                name,
                "IPv4",
                &[(pname, 8080, proto)],
                &eps,
            );
            (svc, slice)
        })
}

/// Hostile services and slices, and coherent pairs, as one snapshot's objects.
fn hostile_objects(
    services: std::ops::Range<usize>,
    slices: std::ops::Range<usize>,
) -> impl Strategy<Value = (Vec<Service>, Vec<EndpointSlice>)> {
    (
        vec(hostile_service(), services),
        vec(hostile_slice(), slices),
        vec(coherent_pair(), 0..6),
    )
        .prop_map(|(mut services, mut slices, pairs)| {
            for (svc, slice) in pairs {
                services.push(svc);
                slices.push(slice);
            }
            (services, slices)
        })
}

/// The valid service every case checks: `good/web` on 10.100.0.1:80 over two pods (addresses
/// no hostile object uses for a frontend).
fn good() -> (Service, EndpointSlice) {
    (
        testutil::service("good", "web", &["10.100.0.1"], &[("http", 80, "TCP")]),
        testutil::slice(
            "good",
            "web-1",
            "web",
            "IPv4",
            &[("http", 8080, "TCP")],
            &[testutil::ready("10.244.9.1"), testutil::ready("10.244.9.2")],
        ),
    )
}

/// What `good/web` is served as: its frontend's backends.
fn good_backends(c: &Contents) -> Option<Vec<String>> {
    let (key, value) = c
        .services
        .iter()
        .find(|(k, _)| frontend_string(k) == "10.100.0.1:80/TCP")?;
    let _ = key;
    let mut backends: Vec<String> = c
        .live_slots(value)
        .map(|(_, id)| to_socket_addr(&c.backends[id]).to_string())
        .collect();
    backends.sort();
    Some(backends)
}

struct Pipeline {
    store: Store,
    rec: Reconciler<FakeDatapath>,
    syncs: usize,
}

impl Pipeline {
    fn new(scale: u32) -> Self {
        let mut store = Store::new(Some("n1".into()));
        store.set_addresses(vec![
            "192.0.2.1".parse().unwrap(),
            "fd00:2::1".parse().unwrap(),
        ]);
        Self {
            store,
            rec: Reconciler::new(FakeDatapath::new(caps(scale)), LIMITS).unwrap(),
            syncs: 0,
        }
    }

    /// Applies `snapshot` and syncs everything it changed; every other sync is followed by
    /// a retirement, so some syncs meet what the one before left for deletion.
    fn sync(&mut self, snapshot: Snapshot) {
        let dirty = self.store.update(Update::Snapshot(snapshot));
        self.rec.sync(&self.store, dirty);
        self.syncs += 1;
        if self.syncs.is_multiple_of(2) {
            self.rec.retire();
        }
        assert_eq!(
            self.rec.contents(),
            &self.rec.datapath().contents,
            "the mirror equals the maps"
        );
    }

    fn good_backends(&self) -> Option<Vec<String>> {
        good_backends(&self.rec.datapath().contents)
    }
}

fn snapshot(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Snapshot {
    let (svc, slice) = good();
    Snapshot {
        services: services.into_iter().chain([svc]).collect(),
        slices: slices.into_iter().chain([slice]).collect(),
        nodes: vec![],
    }
}

const GOOD: [&str; 2] = ["10.244.9.1:8080", "10.244.9.2:8080"];

proptest! {
    /// Any text: the manifest parser returns documents or an error.
    #[test]
    fn manifest_parsing_never_panics(text in ".{0,400}") {
        let _ = parse_manifest(&text);
    }

    /// Random objects written as manifests (JSON and YAML) parse back to objects that the
    /// pipeline takes.
    #[test]
    fn manifests_of_hostile_objects_parse(
        services in vec(hostile_service(), 0..4),
        slices in vec(hostile_slice(), 0..4),
    ) {
        let mut text = String::new();
        for s in &services {
            let mut v = serde_json::to_value(s).unwrap();
            v["apiVersion"] = "v1".into();
            v["kind"] = "Service".into();
            text.push_str(&serde_yaml_ng::to_string(&v).unwrap());
            text.push_str("---\n");
        }
        for s in &slices {
            let mut v = serde_json::to_value(s).unwrap();
            v["apiVersion"] = "discovery.k8s.io/v1".into();
            v["kind"] = "EndpointSlice".into();
            text.push_str(&serde_json::to_string(&v).unwrap());
            text.push_str("\n---\n");
        }
        let _ = parse_manifest(&text);
    }

    /// Hostile objects next to a valid service: nothing panics, every write leaves the maps
    /// consistent, and the valid service is served exactly, before, during and after.
    #[test]
    fn hostile_objects_never_disturb_a_valid_service(
        first in hostile_objects(0..6, 0..8),
        second in hostile_objects(0..6, 0..8),
    ) {
        let mut p = Pipeline::new(16);
        p.sync(snapshot(vec![], vec![]));
        prop_assert_eq!(p.good_backends(), Some(GOOD.map(String::from).to_vec()));
        p.sync(snapshot(first.0, first.1));
        prop_assert_eq!(p.good_backends(), Some(GOOD.map(String::from).to_vec()));
        p.sync(snapshot(second.0, second.1));
        prop_assert_eq!(p.good_backends(), Some(GOOD.map(String::from).to_vec()));
    }

    /// With maps too small for the hostile objects, what is refused is refused whole: the
    /// valid service programmed first keeps serving.
    #[test]
    fn full_maps_never_break_a_programmed_service(
        objects in hostile_objects(1..8, 1..10),
    ) {
        let mut p = Pipeline::new(1);
        p.sync(snapshot(vec![], vec![]));
        prop_assert_eq!(p.good_backends(), Some(GOOD.map(String::from).to_vec()));
        p.sync(snapshot(objects.0, objects.1));
        prop_assert_eq!(p.good_backends(), Some(GOOD.map(String::from).to_vec()));
    }
}

/// Services claiming 10.96.7.7:80/TCP: each (age in seconds, borrowed) makes service `s<i>`
/// (UID `u<i>`) with that address as its cluster IP, or as an external IP next to a cluster
/// IP of its own, and one backend of its own, 10.244.7.<i>:8080.
fn claimants(claims: &[(i64, bool)]) -> Vec<(Service, EndpointSlice)> {
    claims
        .iter()
        .enumerate()
        .map(|(i, (age, borrowed))| {
            let name = format!("s{i}");
            let own = format!("10.96.8.{i}");
            let cluster = if *borrowed { own.as_str() } else { "10.96.7.7" };
            let mut svc = testutil::service("ns", &name, &[cluster], &[("http", 80, "TCP")]);
            if *borrowed {
                svc.spec.as_mut().unwrap().external_ips = Some(vec!["10.96.7.7".into()]);
            }
            let at = jiff::Timestamp::from_second(1_000 + age).unwrap();
            svc.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
            svc.metadata.uid = Some(format!("u{i}"));
            let backend = format!("10.244.7.{i}");
            let slice = testutil::slice(
                "ns",
                &format!("{name}-1"),
                &name,
                "IPv4",
                &[("http", 8080, "TCP")],
                &[testutil::ready(&backend)],
            );
            (svc, slice)
        })
        .collect()
}

/// The backends 10.96.7.7:80/TCP is served with.
fn contested(c: &Contents) -> Option<Vec<String>> {
    let value = c
        .services
        .iter()
        .find(|(k, _)| frontend_string(k) == "10.96.7.7:80/TCP")?
        .1;
    Some(
        c.live_slots(value)
            .map(|(_, id)| to_socket_addr(&c.backends[id]).to_string())
            .collect(),
    )
}

proptest! {
    /// Whatever order services claiming one frontend come and go in, the same one owns it:
    /// a cluster IP before an external IP, then the oldest, then the smallest UID; and a
    /// restarted agent decides the same.
    #[test]
    fn claims_give_the_same_owner_in_any_order(
        claims in vec((0i64..3, any::<bool>()), 2..6),
        order in Just((0..6).collect::<Vec<usize>>()).prop_shuffle(),
        gone in 0usize..6,
    ) {
        let all = claimants(&claims);
        let order: Vec<usize> = order.into_iter().filter(|i| *i < all.len()).collect();
        let expected = |present: &[usize]| {
            present
                .iter()
                .min_by_key(|i| (claims[**i].1, claims[**i].0, format!("u{i}")))
                .map(|i| vec![format!("10.244.7.{i}:8080")])
        };
        let mut p = Pipeline::new(16);
        let mut present = Vec::new();
        for i in &order {
            present.push(*i);
            let (services, slices) = present.iter().map(|i| all[*i].clone()).unzip();
            p.sync(Snapshot { services, slices, nodes: vec![] });
            // A frontend changed twice within a grace period waits for the retirement.
            p.rec.retire_now();
            prop_assert_eq!(contested(p.rec.contents()), expected(&present));
        }
        // One goes: the next by the same rule takes over.
        present.retain(|i| *i != gone % all.len());
        let (services, slices): (Vec<_>, Vec<_>) = present.iter().map(|i| all[*i].clone()).unzip();
        p.sync(Snapshot { services: services.clone(), slices: slices.clone(), nodes: vec![] });
        p.rec.retire_now();
        prop_assert_eq!(contested(p.rec.contents()), expected(&present));
        // A restarted agent adopts the maps and keeps the owner.
        let programmed = p.rec.contents().clone();
        let mut q = Pipeline::new(16);
        q.rec = Reconciler::new(FakeDatapath::with_contents(caps(16), programmed), LIMITS).unwrap();
        q.sync(Snapshot { services, slices, nodes: vec![] });
        q.rec.retire_now();
        prop_assert_eq!(contested(q.rec.contents()), expected(&present));
    }
}

#[test]
fn many_slices_and_duplicate_endpoints_of_one_service_are_merged() {
    // 500 slices, each naming the same two pods (and one of its own): one frontend with the
    // distinct backends, within the per-service limit.
    let (svc, _) = good();
    let slices: Vec<EndpointSlice> = (0..500)
        .map(|i| {
            let own = format!("10.244.{}.{}", 10 + i / 250, i % 250);
            testutil::slice(
                "good",
                &format!("web-{i}"),
                "web",
                "IPv4",
                &[("http", 8080, "TCP")],
                &[
                    testutil::ready("10.244.9.1"),
                    testutil::ready("10.244.9.2"),
                    testutil::ready(&own),
                ],
            )
        })
        .collect();
    let mut p = Pipeline::new(64);
    let dirty = p.store.update(Update::Snapshot(Snapshot {
        services: vec![svc],
        slices,
        nodes: vec![],
    }));
    let report = p.rec.sync(&p.store, dirty);
    // 502 distinct backends, over the limit of 16: a stable subset of 16 serves, with a
    // warning.
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.limited.len(), 1, "{:?}", report.limited);
    let served = p.good_backends().expect("programmed");
    assert_eq!(served.len(), 16);
    let distinct: std::collections::BTreeSet<&String> = served.iter().collect();
    assert_eq!(distinct.len(), 16, "no backend twice");
}
