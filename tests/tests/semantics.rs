//! Kubernetes service semantics end to end, through the socket hooks, with the file source.
//! All services here have no selector: their EndpointSlices are written by hand, and work
//! the same as controller-written ones. Needs root (see tests/README.md).

use std::{thread, time::Duration};

use lb_tests::{
    fixture::BACKEND_PORT,
    manifest::{Ep, Svc, documents, node, service, slice},
    probe::{Attempt, names},
    require_privileges,
    world::World,
};
use serde_json::json;

const P: i64 = BACKEND_PORT as i64;
const VIP: &str = "10.96.1.1";

/// A world with `n` backends serving, named b0...
fn world(n: usize) -> World {
    World::with_backends(n, BACKEND_PORT)
}

/// `svc` (on VIP:80/TCP) with one IPv4 slice of `eps`.
fn manifest(svc: Svc, eps: &[Ep]) -> String {
    documents(&[
        svc.yaml(),
        slice("demo", "s-1", "s", "IPv4", &[("", P, "TCP")], eps),
    ])
}

fn plain() -> Svc {
    Svc::new("demo", "s", &[VIP], &[("", 80, "TCP")])
}

fn connect(w: &World, n: u32) -> Vec<Attempt> {
    w.probe(&["tcp", &format!("{VIP}:80"), "--count", &n.to_string()])
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn session_affinity_keeps_a_client_on_one_backend_and_never_reuses_a_removed_one() {
    require_privileges("session_affinity");
    let mut w = world(3);
    let sticky = || plain().spec("sessionAffinity", json!("ClientIP"));
    let all: Vec<Ep> = (0..3).map(|i| Ep::ready(w.backend_v4(i))).collect();
    w.write_manifest("s.yaml", &manifest(sticky(), &all));
    w.start_agent(&[]);
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 3);

    let first = Attempt::backends(&connect(&w, 30));
    assert_eq!(first.len(), 1, "one backend for the client: {first:?}");
    let pinned = first.into_iter().next().expect("one");
    let index: usize = pinned[1..].parse().expect("b<i>");
    // lbctl affinity shows the client's entry, on that backend, honoured and not expired.
    let rows: Vec<lb_userspace::cli::AffinityRow> =
        w.lbctl_json(&["affinity"]).expect("lbctl affinity");
    let ours: Vec<_> = rows.iter().filter(|r| r.service == "demo/s").collect();
    assert_eq!(ours.len(), 1, "one client namespace: {rows:?}");
    let backend = format!("{}:{P}", w.backend_v4(index));
    assert_eq!(ours[0].backend.map(|b| b.to_string()), Some(backend));
    assert!(
        ours[0].honoured && ours[0].expires_in_s > 10_000,
        "{:?}",
        ours[0]
    );

    // The pinned backend leaves the service: the client moves, and sticks again.
    let rest: Vec<Ep> = (0..3)
        .filter(|&i| i != index)
        .map(|i| Ep::ready(w.backend_v4(i)))
        .collect();
    w.write_manifest("s.yaml", &manifest(sticky(), &rest));
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 2);
    let second = Attempt::backends(&connect(&w, 30));
    assert_eq!(second.len(), 1, "sticks to one backend again: {second:?}");
    assert!(
        !second.contains(&pinned),
        "{pinned} was removed and is not reused"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn session_affinity_expires_after_its_timeout() {
    require_privileges("session_affinity_expires_after_its_timeout");
    let mut w = world(2);
    let sticky = plain().spec("sessionAffinity", json!("ClientIP")).spec(
        "sessionAffinityConfig",
        json!({"clientIP": {"timeoutSeconds": 1}}),
    );
    let all: Vec<Ep> = (0..2).map(|i| Ep::ready(w.backend_v4(i))).collect();
    w.write_manifest("s.yaml", &manifest(sticky, &all));
    w.start_agent(&[]);
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 2);
    let hits = |w: &World| w.stats().get("affinity_hit").copied().unwrap_or(0);

    Attempt::backends(&connect(&w, 1));
    Attempt::backends(&connect(&w, 3));
    assert_eq!(hits(&w), 3, "within the timeout every connection is a hit");
    thread::sleep(Duration::from_millis(1500));
    Attempt::backends(&connect(&w, 1));
    assert_eq!(hits(&w), 3, "after the timeout the backend is chosen anew");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn terminating_endpoints_serve_only_while_none_is_ready() {
    require_privileges("terminating_endpoints_serve_only_while_none_is_ready");
    let mut w = world(2);
    let terminating: Vec<Ep> = (0..2).map(|i| Ep::terminating(w.backend_v4(i))).collect();
    w.write_manifest("s.yaml", &manifest(plain(), &terminating));
    w.start_agent(&[]);
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 2);
    assert_eq!(Attempt::backends(&connect(&w, 30)), names(&["b0", "b1"]));

    let mixed = [Ep::ready(w.backend_v4(0)), Ep::terminating(w.backend_v4(1))];
    w.write_manifest("s.yaml", &manifest(plain(), &mixed));
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 1);
    assert_eq!(Attempt::backends(&connect(&w, 20)), names(&["b0"]));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    require_privileges("internal_traffic_policy_local");
    let mut w = world(2);
    let local = || plain().spec("internalTrafficPolicy", json!("Local"));
    let eps = [
        Ep::ready(w.backend_v4(0)).on_node("node-a"),
        Ep::ready(w.backend_v4(1)).on_node("node-b"),
    ];
    w.write_manifest("s.yaml", &manifest(local(), &eps));
    w.start_agent(&["--node-name", "node-a"]);
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 1);
    assert_eq!(Attempt::backends(&connect(&w, 20)), names(&["b0"]));

    // No local endpoint: refused, even though a remote one is ready.
    let remote = [Ep::ready(w.backend_v4(1)).on_node("node-b")];
    w.write_manifest("s.yaml", &manifest(local(), &remote));
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 0);
    for a in connect(&w, 3) {
        assert_eq!(a.error.as_deref(), Some("ECONNREFUSED"), "{a:?}");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn topology_hints_steer_to_this_nodes_zone() {
    require_privileges("topology_hints_steer_to_this_nodes_zone");
    let mut w = world(2);
    let eps = [
        Ep::ready(w.backend_v4(0)).for_zones(&["zone-a"]),
        Ep::ready(w.backend_v4(1)).for_zones(&["zone-b"]),
    ];
    w.write_manifest("s.yaml", &manifest(plain(), &eps));
    w.write_manifest("node.yaml", &node("node-1", "zone-a"));
    w.start_agent(&["--node-name", "node-1"]);
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 1);
    assert_eq!(Attempt::backends(&connect(&w, 20)), names(&["b0"]));

    // The node moves to zone-b: every service is recomputed.
    w.write_manifest("node.yaml", &node("node-1", "zone-b"));
    w.wait_until("the zone-b endpoint serves", Duration::from_secs(5), || {
        w.service(&format!("{VIP}:80/TCP"))
            .first()
            .and_then(|d| d.slots.first().and_then(|s| s.backend))
            .is_some_and(|b| b.ip() == w.backend_v4(1))
    });
    assert_eq!(Attempt::backends(&connect(&w, 20)), names(&["b1"]));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn external_ips_are_served_for_connections_from_this_node() {
    require_privileges("external_ips_are_served_for_connections_from_this_node");
    let mut w = world(2);
    let svc = plain().spec("externalIPs", json!(["192.0.2.10"]));
    let eps: Vec<Ep> = (0..2).map(|i| Ep::ready(w.backend_v4(i))).collect();
    w.write_manifest("s.yaml", &manifest(svc, &eps));
    w.start_agent(&[]);
    w.wait_for_backends("192.0.2.10:80/TCP", 2);
    let attempts = w.probe(&["tcp", "192.0.2.10:80", "--count", "30"]);
    assert_eq!(Attempt::backends(&attempts), names(&["b0", "b1"]));
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some("192.0.2.10:80"))
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_pod_reaching_its_own_service_lands_on_itself() {
    require_privileges("a_pod_reaching_its_own_service_lands_on_itself");
    let mut w = World::new(0);
    w.serve_in_client("self", BACKEND_PORT);
    w.write_manifest("s.yaml", &manifest(plain(), &[Ep::ready(w.client_v4())]));
    w.start_agent(&[]);
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 1);
    let attempts = connect(&w, 10);
    assert_eq!(Attempt::backends(&attempts), names(&["self"]));
    assert!(
        attempts
            .iter()
            .all(|a| a.peer.as_deref() == Some(&*format!("{VIP}:80")))
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn one_port_number_over_tcp_and_udp_is_two_frontends() {
    require_privileges("one_port_number_over_tcp_and_udp_is_two_frontends");
    let mut w = world(1);
    let ports = [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")];
    let slice_ports = [("dns", P, "UDP"), ("dns-tcp", P, "TCP")];
    w.write_manifest(
        "dns.yaml",
        &documents(&[
            service("kube-system", "dns", &[VIP], &ports),
            slice(
                "kube-system",
                "dns-1",
                "dns",
                "IPv4",
                &slice_ports,
                &[Ep::ready(w.backend_v4(0))],
            ),
        ]),
    );
    w.start_agent(&[]);
    w.wait_for_backends(&format!("{VIP}:53/TCP"), 1);
    w.wait_for_backends(&format!("{VIP}:53/UDP"), 1);
    let addr = format!("{VIP}:53");
    assert_eq!(
        Attempt::backends(&w.probe(&["tcp", &addr, "--count", "3"])),
        names(&["b0"])
    );
    assert_eq!(
        Attempt::backends(&w.probe(&["udp", &addr, "--count", "3"])),
        names(&["b0"])
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn services_of_another_proxy_and_headless_services_get_no_entries() {
    require_privileges("services_of_another_proxy_and_headless_services_get_no_entries");
    let mut w = world(1);
    let ep = [Ep::ready(w.backend_v4(0))];
    let other = Svc::new("demo", "other", &["10.96.1.2"], &[("", 80, "TCP")])
        .label("service.kubernetes.io/service-proxy-name", "someone-else");
    let headless = Svc::new("demo", "headless", &["None"], &[("", 80, "TCP")]);
    w.write_manifest("other.yaml", &other.yaml());
    w.write_manifest("headless.yaml", &headless.yaml());
    w.write_manifest("s.yaml", &manifest(plain(), &ep));
    w.start_agent(&[]);
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 1);
    let frontends: Vec<String> = w.services().into_iter().map(|r| r.frontend).collect();
    assert_eq!(frontends, [format!("{VIP}:80/TCP")]);
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn explain_says_why_each_endpoint_is_or_is_not_eligible() {
    require_privileges("explain_says_why_each_endpoint_is_or_is_not_eligible");
    let mut w = world(4);
    let svc = plain().spec("internalTrafficPolicy", json!("Local"));
    let eps = [
        Ep::ready(w.backend_v4(0)).on_node("node-a"),
        Ep::not_ready(w.backend_v4(1)).on_node("node-a"),
        Ep::terminating(w.backend_v4(2)).on_node("node-a"),
        Ep::ready(w.backend_v4(3)).on_node("node-b"),
    ];
    w.write_manifest("s.yaml", &manifest(svc, &eps));
    w.start_agent(&["--node-name", "node-a"]);
    w.wait_for_backends(&format!("{VIP}:80/TCP"), 1);
    // The agent answers on a Unix socket only root reaches (lbctl finds it by --pin-dir).
    let socket = lb_userspace::agent::health::explain_socket(w.pin_dir(), None);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&socket)
            .expect("the explain socket")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "{}", socket.display());

    let out = w
        .lbctl(&["-o", "json", "explain", &format!("{VIP}:80")])
        .expect("lbctl explain");
    let e: lb_userspace::cli::Explanation = serde_json::from_str(&out).expect("JSON");
    let socket = e.socket.expect("a socket frontend");
    assert_eq!(socket.service, "demo/s");
    let b0: std::net::SocketAddr = format!("{}:{P}", w.backend_v4(0)).parse().unwrap();
    assert_eq!(socket.backends.len(), 1);
    assert_eq!(
        (socket.backends[0].backend, socket.backends[0].percent),
        (Some(b0), 100.0)
    );
    assert!(e.north_south.is_none());
    let ports = e.endpoints.expect("the agent's verdicts");
    let eps = ports.ports[0].endpoints.clone();
    let verdicts: Vec<(bool, String)> = eps
        .iter()
        .map(|ep| (ep.cluster_ip.eligible, ep.cluster_ip.why.clone()))
        .collect();
    assert_eq!(verdicts[0], (true, "ready".to_string()), "{eps:?}");
    assert_eq!(verdicts[1], (false, "not ready".to_string()), "{eps:?}");
    assert!(
        !verdicts[2].0 && verdicts[2].1.starts_with("serving but terminating"),
        "{eps:?}"
    );
    assert!(
        !verdicts[3].0
            && verdicts[3]
                .1
                .contains("on node node-b, not this one (node-a)"),
        "{eps:?}"
    );
    // The text says the same; an unknown address is an error.
    let text = w.lbctl(&["explain", &format!("{VIP}:80")]).expect("text");
    assert!(text.contains("one of 1 slots at random"), "{text}");
    assert!(text.contains("the traffic policy is Local"), "{text}");
    assert!(
        w.lbctl(&["explain", "10.96.99.99:80", "--agent", "off"])
            .is_err()
    );
}
