//! Connected UDP sockets that the hooks pointed at a removed backend are destroyed, so the
//! application reconnects and is balanced again; nothing else is touched. Needs root (see
//! tests/README.md).

use std::{thread, time::Duration};

use lb_tests::{
    fixture::BACKEND_PORT,
    manifest::{Ep, documents, service, slice},
    require_privileges,
    world::{Held, World},
};

const P: i64 = BACKEND_PORT as i64;
const VIP: &str = "10.96.2.1";

fn manifest(w: &World, backends: &[usize]) -> String {
    let eps: Vec<Ep> = backends
        .iter()
        .map(|&i| Ep::ready(w.backend_v4(i)))
        .collect();
    let ports = [("dns", P, "UDP"), ("dns-tcp", P, "TCP")];
    documents(&[
        service(
            "kube-system",
            "dns",
            &[VIP],
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        ),
        slice("kube-system", "dns-1", "dns", "IPv4", &ports, &eps),
    ])
}

/// Until the agent destroys it the socket still reaches the removed backend `gone` (which
/// still runs); then the resolver's call fails, it reconnects, and lands on backend `stays`.
fn moves_on(resolver: &mut Held, gone: &str, stays: usize, vip: &str) {
    let mut moved = None;
    for _ in 0..40 {
        let a = resolver.ping();
        if let Some(error) = a.error {
            let retry = resolver.next_report();
            moved = Some((error, retry));
            break;
        }
        assert_eq!(
            a.backend.as_deref(),
            Some(gone),
            "before destruction, the old backend"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let (error, retry) = moved.expect("the stale socket was destroyed within 2 s");
    assert!(
        ["ECONNABORTED", "EDESTADDRREQ"].contains(&error.as_str()),
        "the application sees the socket aborted: {error}"
    );
    assert_eq!(retry.error, None);
    assert_eq!(
        retry.backend,
        Some(format!("b{stays}")),
        "the reconnect is balanced again"
    );
    assert_eq!(retry.peer.as_deref(), Some(vip));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_stale_connected_udp_socket_is_destroyed_and_the_client_moves_on() {
    require_privileges("a_stale_connected_udp_socket_is_destroyed");
    let mut w = World::with_backends(2, BACKEND_PORT);
    w.write_manifest("dns.yaml", &manifest(&w, &[0, 1]));
    w.start_agent(&[]);
    w.wait_for_backends(&format!("{VIP}:53/UDP"), 2);

    // A resolver-like socket through the VIP, and TCP through the VIP, both on the same
    // backend; and a UDP socket to that backend's pod IP directly.
    let vip = format!("{VIP}:53");
    let mut resolver = w.hold_udp(&vip);
    let gone = resolver.first.backend.clone().expect("answered");
    let index: usize = gone[1..].parse().expect("b<i>");
    let mut tcp = (0..60)
        .map(|_| w.hold(&vip))
        .find(|h| h.first.backend.as_ref() == Some(&gone))
        .expect("a TCP connection reaches the same backend");
    let mut direct = w.hold_udp(&format!("{}:{BACKEND_PORT}", w.backend_v4(index)));

    let stays = 1 - index;
    w.write_manifest("dns.yaml", &manifest(&w, &[stays]));
    w.wait_for_backends(&format!("{VIP}:53/UDP"), 1);

    moves_on(&mut resolver, &gone, stays, &vip);
    // The agent logs the count once the whole sweep is done.
    w.wait_until(
        "the agent reports one socket destroyed",
        Duration::from_secs(5),
        || w.agent_log().contains("destroyed=1"),
    );

    // What the hooks did not translate, and TCP, are left alone.
    let a = direct.ping();
    assert_eq!(
        (a.error, a.backend.as_ref()),
        (None, Some(&gone)),
        "a direct socket is kept"
    );
    let a = tcp.ping();
    assert_eq!(
        (a.error, a.backend.as_ref()),
        (None, Some(&gone)),
        "TCP connections are kept"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_stale_udp_socket_is_found_after_a_storm_of_tcp_connects_evicted_its_reverse_nat() {
    require_privileges("a_stale_udp_socket_is_found_after_a_storm_of_tcp_connects");
    // A reverse-NAT map of 1024 and five times as many TCP connects after the UDP socket's:
    // its LRU entry is long evicted, and the socket is found all the same.
    let mut w = World::with_backends(2, BACKEND_PORT);
    w.write_manifest("dns.yaml", &manifest(&w, &[0, 1]));
    w.start_agent(&["--max-rev-nat", "1024"]);
    w.wait_for_backends(&format!("{VIP}:53/UDP"), 2);
    let vip = format!("{VIP}:53");
    let mut resolver = w.hold_udp(&vip);
    let gone = resolver.first.backend.clone().expect("answered");
    let index: usize = gone[1..].parse().expect("b<i>");

    let storm = w.probe(&["tcp", &vip, "--count", "5000"]);
    assert!(storm.iter().all(|a| a.error.is_none()));
    let rev_nat = w
        .capacity()
        .into_iter()
        .find(|r| r.map == "lb_revnat_v1")
        .expect("row");
    assert!(
        rev_nat.capacity == 1024 && rev_nat.entries > 512,
        "the reverse-NAT map churned through TCP sockets: {rev_nat:?}"
    );
    // The resolver is still there, silent meanwhile, read with recv().
    assert_eq!(resolver.ping().backend.as_deref(), Some(gone.as_str()));

    let stays = 1 - index;
    w.write_manifest("dns.yaml", &manifest(&w, &[stays]));
    moves_on(&mut resolver, &gone, stays, &vip);
    // Closed sockets leave the connected-UDP-socket map: only the reconnected one is there.
    drop(resolver);
    w.wait_until(
        "closed UDP sockets are forgotten",
        Duration::from_secs(5),
        || {
            w.capacity()
                .into_iter()
                .find(|r| r.map == "lb_udpsock_v1")
                .is_some_and(|r| r.entries == 0)
        },
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_agent_with_only_the_daemonsets_capabilities_serves_and_finds_stale_sockets() {
    require_privileges("an_agent_with_only_the_daemonsets_capabilities");
    // No CAP_SYS_PTRACE: the client's namespace, whose processes hold more capabilities than
    // the agent, is found where `ip netns` pins it (/run/netns), as a runtime pins pods'.
    let caps: Vec<String> = lb_userspace::agent::privileges::DAEMONSET
        .iter()
        .map(|c| c.to_string().trim_start_matches("CAP_").to_lowercase())
        .collect();
    let caps: Vec<&str> = caps.iter().map(String::as_str).collect();
    let mut w = World::with_backends(2, BACKEND_PORT);
    w.write_manifest("dns.yaml", &manifest(&w, &[0, 1]));
    w.start_agent_confined(&caps, &[]);
    w.wait_for_backends(&format!("{VIP}:53/UDP"), 2);
    let pid = w.agent_pid().expect("runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).expect("hex"))
        .expect("CapEff");
    assert_eq!(
        effective
            & !lb_userspace::agent::privileges::mask(&lb_userspace::agent::privileges::DAEMONSET),
        0,
        "nothing beyond the DaemonSet's capabilities"
    );

    let vip = format!("{VIP}:53");
    let mut resolver = w.hold_udp(&vip);
    let gone = resolver.first.backend.clone().expect("answered");
    let index: usize = gone[1..].parse().expect("b<i>");
    let stays = 1 - index;
    w.write_manifest("dns.yaml", &manifest(&w, &[stays]));
    moves_on(&mut resolver, &gone, stays, &vip);
    let log = w.agent_log();
    assert!(
        !log.contains("could not look for stale UDP sockets"),
        "{log}"
    );
}
