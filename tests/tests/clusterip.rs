//! ClusterIP load balancing by the socket hooks, with real sockets in network namespaces.
//! Needs root (see tests/README.md).

use std::collections::BTreeMap;

use lb_userspace::cli::{BackendStatsRow, ServiceStatsRow};

use lb_tests::{
    fixture::{BACKEND_PORT, other_manifest, web_manifest, web_world},
    manifest::{Ep, Svc, documents, service, slice},
    probe::Attempt,
    require_privileges,
    world::World,
};

const PORT: u16 = BACKEND_PORT;
const SPORT: i64 = PORT as i64;

fn three_backends(agent_args: &[&str]) -> World {
    web_world(3, agent_args)
}

/// How many attempts each backend answered; panics on any failed attempt.
fn shares(attempts: &[Attempt]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for a in attempts {
        assert_eq!(a.error, None, "every request is answered: {a:?}");
        *out.entry(a.backend.clone().expect("answered")).or_default() += 1;
    }
    out
}

/// Each of the three backends got a fair share of `n` requests. With uniform choice a share
/// is Binomial(n, 1/3); the bound sits over 5 standard deviations below the mean.
fn assert_fair(attempts: &[Attempt], n: usize) {
    let shares = shares(attempts);
    assert_eq!(attempts.len(), n);
    assert_eq!(shares.len(), 3, "every backend is used: {shares:?}");
    let min = n / 5;
    assert!(
        shares.values().all(|&s| s >= min),
        "each backend gets at least {min} of {n}: {shares:?}"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn tcp_connects_to_the_vip_are_spread_over_every_backend() {
    require_privileges("tcp_connects_to_the_vip_are_spread_over_every_backend");
    let w = three_backends(&[]);
    let attempts = w.probe(&["tcp", "10.96.0.10:80", "--count", "300"]);
    assert_fair(&attempts, 300);
    for a in &attempts {
        assert_eq!(
            a.peer.as_deref(),
            Some("10.96.0.10:80"),
            "getpeername shows the VIP"
        );
        let client = a.client.as_deref().unwrap_or_default();
        assert!(
            client.starts_with("[::ffff:10.244.0.2]:"),
            "the backend sees the client's own address: {a:?}"
        );
    }
    // lbctl capacity counts what the maps hold against their capacities.
    let capacity = w.capacity();
    let entries = |map: &str| {
        capacity
            .iter()
            .find(|r| r.map == map)
            .unwrap_or_else(|| panic!("{map} in {capacity:?}"))
    };
    assert_eq!(entries("lb_svc_v2").entries, w.services().len() as u64);
    assert_eq!(entries("lb_be_v1").entries, w.backends().len() as u64);
    assert_eq!(entries("lb_svc_v2").flag, "--max-services");
    let rev_nat = entries("lb_revnat_v1");
    assert!(
        rev_nat.entries >= 1 && rev_nat.capacity > rev_nat.entries,
        "the connects left reverse-NAT entries: {rev_nat:?}"
    );
    // The per-frontend and per-backend counters count exactly these connections.
    let rows: Vec<ServiceStatsRow> = w.lbctl_json(&["stats", "--services"]).expect("stats");
    let tcp = rows
        .iter()
        .find(|r| r.frontend == "10.96.0.10:80/TCP")
        .expect("the frontend");
    assert_eq!(
        (tcp.path.as_str(), tcp.connections, tcp.rejected),
        ("socket", 300, 0)
    );
    let by_backend: Vec<BackendStatsRow> = w.lbctl_json(&["stats", "--backends"]).expect("stats");
    for (name, n) in shares(&attempts) {
        let i: usize = name.trim_start_matches('b').parse().expect("bN");
        let address = format!("{}:{PORT}", w.backend_v4(i));
        let row = by_backend
            .iter()
            .find(|r| r.address.to_string() == address)
            .expect("the backend");
        assert_eq!(row.connections as usize, n, "{address}");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn udp_replies_come_from_the_vip_connected_or_not() {
    require_privileges("udp_replies_come_from_the_vip_connected_or_not");
    let w = three_backends(&[]);
    // Unconnected: each datagram is balanced, and recvfrom reports the VIP as the source.
    let attempts = w.probe(&["udp", "10.96.0.10:53", "--count", "150"]);
    assert_fair(&attempts, 150);
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some("10.96.0.10:53")),
        "every reply's source is the VIP: {:?}",
        attempts
            .iter()
            .find(|a| a.peer.as_deref() != Some("10.96.0.10:53"))
    );
    // Connected: one backend for the socket, and the peer is the VIP.
    let attempts = w.probe(&["udp", "10.96.0.10:53", "--count", "5", "--connected"]);
    assert_eq!(
        shares(&attempts).len(),
        1,
        "a connected socket sticks to its backend"
    );
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some("10.96.0.10:53"))
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn ipv6_tcp_and_udp_are_balanced() {
    require_privileges("ipv6_tcp_and_udp_are_balanced");
    let w = three_backends(&[]);
    let attempts = w.probe(&["tcp", "[fd00:96::10]:80", "--count", "150"]);
    assert_fair(&attempts, 150);
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some("[fd00:96::10]:80"))
    );
    let attempts = w.probe(&["udp", "[fd00:96::10]:53", "--count", "150"]);
    assert_fair(&attempts, 150);
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some("[fd00:96::10]:53"))
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn dual_stack_sockets_reach_ipv4_services_by_v4_mapped_address() {
    require_privileges("dual_stack_sockets_reach_ipv4_services_by_v4_mapped_address");
    let w = three_backends(&[]);
    // An AF_INET6 socket connecting to ::ffff:10.96.0.10 goes through connect6.
    let attempts = w.probe(&["tcp", "[::ffff:10.96.0.10]:80", "--count", "150"]);
    assert_fair(&attempts, 150);
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some("[::ffff:10.96.0.10]:80")),
        "getpeername shows the v4-mapped VIP: {:?}",
        attempts[0]
    );
    let attempts = w.probe(&["udp", "[::ffff:10.96.0.10]:53", "--count", "60"]);
    assert_eq!(shares(&attempts).len(), 3);
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some("[::ffff:10.96.0.10]:53"))
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_service_without_backends_refuses_at_once() {
    require_privileges("a_service_without_backends_refuses_at_once");
    let mut w = World::with_backends(1, PORT);
    w.write_manifest(
        "empty.yaml",
        &documents(&[
            service(
                "demo",
                "empty",
                &["10.96.0.20", "fd00:96::20"],
                &[("", 80, "TCP"), ("dns", 53, "UDP")],
            ),
            // A slice whose only endpoint is not ready.
            slice(
                "demo",
                "empty-1",
                "empty",
                "IPv4",
                &[("", SPORT, "TCP")],
                &[Ep::not_ready(w.backend_v4(0))],
            ),
        ]),
    );
    w.start_agent(&[]);
    w.wait_for_backends("10.96.0.20:80/TCP", 0);
    for (args, what) in [
        (vec!["tcp", "10.96.0.20:80", "--count", "5"], "TCP connect"),
        (
            vec!["tcp", "[fd00:96::20]:80", "--count", "5"],
            "IPv6 TCP connect",
        ),
        (vec!["udp", "10.96.0.20:53", "--count", "5"], "UDP sendto"),
        (
            vec!["udp", "10.96.0.20:53", "--count", "5", "--connected"],
            "UDP connect",
        ),
    ] {
        for a in w.probe(&args) {
            assert_eq!(a.error.as_deref(), Some("ECONNREFUSED"), "{what}: {a:?}");
            assert!(
                a.micros < 100_000,
                "{what} is refused at once, not after a timeout: {a:?}"
            );
        }
    }
    let rows: Vec<ServiceStatsRow> = w.lbctl_json(&["stats", "--services"]).expect("stats");
    let refused = |f: &str| rows.iter().find(|r| r.frontend == f).map(|r| r.rejected);
    assert_eq!(refused("10.96.0.20:80/TCP"), Some(5));
    // Five datagrams, and the one connect() of the connected socket.
    assert_eq!(refused("10.96.0.20:53/UDP"), Some(6));
    assert_eq!(refused("[fd00:96::20]:80/TCP"), Some(5));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn malformed_input_is_skipped_and_other_services_keep_working() {
    require_privileges("malformed_input_is_skipped_and_other_services_keep_working");
    let mut w = World::with_backends(2, PORT);
    let eps = |n: usize| -> Vec<Ep> { (0..n).map(|i| Ep::ready(w.backend_v4(i))).collect() };
    let good = documents(&[
        service("demo", "good", &["10.96.0.30"], &[("", 80, "TCP")]),
        slice(
            "demo",
            "good-1",
            "good",
            "IPv4",
            &[("", SPORT, "TCP")],
            &eps(2),
        ),
    ]);
    w.write_manifest("good.yaml", &good);
    w.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: [unclosed\n",
    );
    w.write_manifest(
        "bad-ip.yaml",
        &service("demo", "bad-ip", &["10.96.0.999"], &[("", 80, "TCP")]),
    );
    w.write_manifest(
        "bad-port.yaml",
        &service("demo", "bad-port", &["10.96.0.32"], &[("", 70000, "TCP")]),
    );
    w.write_manifest(
        "bad-proto.yaml",
        &service("demo", "bad-proto", &["10.96.0.33"], &[("", 80, "QUIC")]),
    );
    w.write_manifest(
        "too-many.yaml",
        &documents(&[
            service("demo", "too-many", &["10.96.0.34"], &[("", 80, "TCP")]),
            slice(
                "demo",
                "too-many-1",
                "too-many",
                "IPv4",
                &[("", SPORT, "TCP")],
                &(1..=3)
                    .map(|i| Ep::ready(format!("10.244.9.{i}")))
                    .collect::<Vec<_>>(),
            ),
        ]),
    );
    w.write_manifest(
        "bad-type.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: bad-type, namespace: demo}\nspec: {ports: [{port: eighty}]}\n",
    );
    w.start_agent(&["--max-backends-per-service", "2"]);
    w.wait_for_backends("10.96.0.30:80/TCP", 2);
    let frontends: Vec<String> = w.services().into_iter().map(|r| r.frontend).collect();
    assert_eq!(
        frontends,
        ["10.96.0.30:80/TCP", "10.96.0.34:80/TCP"],
        "only the valid services are programmed"
    );
    // Over the backend limit: served by a stable subset of the limit, with a warning.
    assert_eq!(w.backend_count("10.96.0.34:80/TCP"), Some(2));
    assert_eq!(
        shares(&w.probe(&["tcp", "10.96.0.30:80", "--count", "20"])).len(),
        2
    );
    let log = w.agent_log();
    for name in [
        "demo/bad-ip",
        "demo/bad-port",
        "demo/bad-proto",
        "demo/too-many",
        "demo/bad-type",
        "broken.yaml",
    ] {
        assert!(log.contains(name), "the log names {name}:\n{log}");
    }

    // Breaking the good service's file keeps it serving, then a fix applies.
    w.write_manifest("good.yaml", &good.replace("10.96.0.30", "10.96.0.300"));
    w.write_manifest(
        "other.yaml",
        &service("demo", "other", &["10.96.0.31"], &[("", 80, "TCP")]),
    );
    w.wait_for_backends("10.96.0.31:80/TCP", 0);
    assert_eq!(
        w.backend_count("10.96.0.30:80/TCP"),
        Some(2),
        "the broken edit is not applied"
    );
    assert_eq!(
        shares(&w.probe(&["tcp", "10.96.0.30:80", "--count", "40"])).len(),
        2
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_full_service_map_refuses_the_newcomer_whole_and_programs_it_once_there_is_room() {
    require_privileges(
        "a_full_service_map_refuses_the_newcomer_whole_and_programs_it_once_there_is_room",
    );
    // demo/web's four frontends fill a service map of four.
    let w = web_world(2, &["--max-services", "4", "--namespace-share", "100"]);
    let vip = format!("{}:80", lb_tests::fixture::WEB_V4);
    let mut held = w.hold(&vip);
    w.write_manifest("other.yaml", &other_manifest(&w));
    w.wait_until(
        "the refusal is logged",
        std::time::Duration::from_secs(10),
        || w.agent_log().contains("map full"),
    );
    assert_eq!(
        w.agent_log().matches("map full").count(),
        1,
        "reported once"
    );
    // Nothing of the newcomer is written, and the rest serves on.
    assert!(w.backend_count("10.96.0.20:80/TCP").is_none());
    let services = w
        .capacity()
        .into_iter()
        .find(|r| r.map == "lb_svc_v2")
        .expect("row");
    assert_eq!((services.entries, services.capacity), (4, 4));
    for a in w.probe(&["tcp", "10.96.0.20:80", "--count", "2"]) {
        assert_eq!(
            a.error.as_deref(),
            Some("ENETUNREACH"),
            "not translated: {a:?}"
        );
    }
    let attempts = w.probe(&["tcp", &vip, "--count", "20"]);
    assert!(attempts.iter().all(|a| a.error.is_none()), "{attempts:?}");
    assert!(held.ping().error.is_none(), "the held connection survives");

    // web goes: the newcomer is programmed in the same sync, without a change of its own.
    w.write_manifest("web.yaml", "");
    w.wait_for_backends("10.96.0.20:80/TCP", 1);
    let attempts = w.probe(&["tcp", "10.96.0.20:80", "--count", "5"]);
    assert!(
        attempts.iter().all(|a| a.backend.as_deref() == Some("b0")),
        "{attempts:?}"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_service_over_the_backend_limit_follows_its_replaced_pods() {
    require_privileges("a_service_over_the_backend_limit_follows_its_replaced_pods");
    // Three endpoints over a limit of two: a stable subset of two serves (so b0 or b1).
    let mut w = World::with_backends(5, PORT);
    w.write_manifest("web.yaml", &web_manifest(&w, &[0, 1, 2]));
    w.start_agent(&["--max-backends-per-service", "2"]);
    w.wait_for_backends("10.96.0.10:80/TCP", 2);
    let vip = "10.96.0.10:80";
    let before = shares(&w.probe(&["tcp", vip, "--count", "40"]));
    assert_eq!(before.len(), 2, "{before:?}");
    // The pods are replaced by new ones: b0 and b1 go, b3 and b4 come.
    w.write_manifest("web.yaml", &web_manifest(&w, &[2, 3, 4]));
    w.wait_until(
        "the subset follows the pods",
        std::time::Duration::from_secs(10),
        || {
            let now = shares(&w.probe(&["tcp", vip, "--count", "40"]));
            now.len() == 2 && !now.contains_key("b0") && !now.contains_key("b1")
        },
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_namespace_over_its_share_leaves_other_namespaces_new_services_programmed() {
    require_privileges(
        "a_namespace_over_its_share_leaves_other_namespaces_new_services_programmed",
    );
    // A service map of 16 and shares of 25%: four frontends per namespace.
    let w = web_world(2, &["--max-services", "16", "--namespace-share", "25"]);
    let one = |ns: &str, name: &str, ip: &str, backend: usize| {
        documents(&[
            service(ns, name, &[ip], &[("", 80, "TCP")]),
            slice(
                ns,
                &format!("{name}-1"),
                name,
                "IPv4",
                &[("", SPORT, "TCP")],
                &[Ep::ready(w.backend_v4(backend))],
            ),
        ])
    };
    for i in 0..5 {
        w.write_manifest(
            &format!("greedy-{i}.yaml"),
            &one("greedy", &format!("s{i}"), &format!("10.96.1.{i}"), 0),
        );
    }
    w.wait_until(
        "the fifth is refused",
        std::time::Duration::from_secs(10),
        || w.agent_log().contains("namespace_share"),
    );
    w.write_manifest("calm.yaml", &one("calm", "new", "10.96.2.1", 1));
    w.wait_for_backends("10.96.2.1:80/TCP", 1);
    let attempts = w.probe(&["tcp", "10.96.2.1:80", "--count", "5"]);
    assert!(
        attempts.iter().all(|a| a.backend.as_deref() == Some("b1")),
        "another namespace's new service is served: {attempts:?}"
    );
    let greedy: Vec<String> = w
        .services()
        .into_iter()
        .map(|r| r.frontend)
        .filter(|f| f.starts_with("10.96.1."))
        .collect();
    assert_eq!(greedy.len(), 4, "greedy holds its share: {greedy:?}");
    let log = w.agent_log();
    let refused = log
        .lines()
        .find(|l| l.contains("namespace_share"))
        .expect("logged");
    assert!(
        refused.contains("greedy/s") && refused.contains("lb_svc_v2"),
        "{refused}"
    );
    let rows: Vec<lb_userspace::model::share::Row> = w
        .lbctl_json(&["capacity", "--namespaces"])
        .expect("lbctl capacity --namespaces");
    let row = rows
        .iter()
        .find(|r| r.namespace == "greedy" && r.map == "lb_svc_v2")
        .expect("greedy's row");
    assert_eq!((row.used, row.share, row.waiting), (4, 4, 1));

    // One of greedy's services goes: the refused one is programmed.
    let waiting = greedy_missing(&greedy);
    w.remove_manifest(if waiting == 0 {
        "greedy-1.yaml"
    } else {
        "greedy-0.yaml"
    });
    w.wait_for_backends(&format!("10.96.1.{waiting}:80/TCP"), 1);
}

/// Which of `10.96.1.0`-`10.96.1.4` is not among `programmed`.
fn greedy_missing(programmed: &[String]) -> usize {
    (0..5)
        .find(|i| !programmed.contains(&format!("10.96.1.{i}:80/TCP")))
        .expect("one is missing")
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn kernel_debug_events_are_logged_only_when_asked_for() {
    require_privileges("kernel_debug_events_are_logged_only_when_asked_for");
    let quiet = three_backends(&[]);
    let attempts = quiet.probe(&["tcp", "10.96.0.10:80", "--count", "5"]);
    assert!(attempts.iter().all(|a| a.error.is_none()));
    assert!(
        !quiet.agent_log().contains("lb_ebpf: kernel: "),
        "off by default"
    );
    drop(quiet);

    let w = three_backends(&["--kernel-debug"]);
    let attempts = w.probe(&["tcp", "10.96.0.10:80", "--count", "5"]);
    assert!(attempts.iter().all(|a| a.error.is_none()));
    w.wait_until(
        "the events are logged",
        std::time::Duration::from_secs(5),
        || {
            w.agent_log()
                .lines()
                .filter(|l| l.contains("lb_ebpf: kernel: socket_translated service="))
                .count()
                >= 5
        },
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_older_service_cannot_take_cluster_dns_through_its_external_ips() {
    require_privileges("an_older_service_cannot_take_cluster_dns_through_its_external_ips");
    // CVE-2020-8554's class: `default/x` (older, a name that sorts first, no endpoints)
    // lists cluster DNS's address among its externalIPs. In either order of creation, and
    // after an agent restart, DNS stays with its own service.
    for x_first in [true, false] {
        let mut w = World::with_backends(2, PORT);
        let dns_ports = [("dns", SPORT, "UDP")];
        let dns = documents(&[
            Svc::new("kube-system", "dns", &["10.96.0.10"], &[("dns", 53, "UDP")])
                .created("2024-05-01T00:00:00Z", "uid-dns")
                .yaml(),
            slice(
                "kube-system",
                "dns-1",
                "dns",
                "IPv4",
                &dns_ports,
                &[Ep::ready(w.backend_v4(0)), Ep::ready(w.backend_v4(1))],
            ),
        ]);
        let x = Svc::new("default", "x", &["10.96.0.99"], &[("dns", 53, "UDP")])
            .spec("externalIPs", serde_json::json!(["10.96.0.10"]))
            .created("2020-01-01T00:00:00Z", "uid-x")
            .yaml();
        let (first, second) = if x_first {
            (("x.yaml", &x), ("dns.yaml", &dns))
        } else {
            (("dns.yaml", &dns), ("x.yaml", &x))
        };
        w.write_manifest(first.0, first.1);
        w.start_agent(&[]);
        w.wait_ready();
        w.write_manifest(second.0, second.1);
        w.wait_for_backends("10.96.0.99:53/UDP", 0);
        w.wait_for_backends("10.96.0.10:53/UDP", 2);
        let check = |w: &World| {
            let attempts = w.probe(&["udp", "10.96.0.10:53", "--count", "20"]);
            let answered = shares(&attempts);
            assert_eq!(answered.len(), 2, "DNS's own backends answer: {answered:?}");
            let owner = w
                .services()
                .into_iter()
                .find(|r| r.frontend == "10.96.0.10:53/UDP")
                .expect("programmed");
            assert_eq!(owner.service, "kube-system/dns", "{owner:?}");
        };
        check(&w);
        let log = w.agent_log();
        assert!(
            log.contains("two services claim one frontend") && log.contains("ignored=default/x"),
            "the loser is reported"
        );
        w.kill_agent();
        w.start_agent(&[]);
        w.wait_ready();
        check(&w);
    }
}
