use std::collections::BTreeMap;

use lb_common::{
    ServiceInfo, ServiceKey, ServiceValue,
    external::{CtEntry, EXTERNAL_F_LOCAL, EXTERNAL_F_SOURCE_RANGES, ExternalCounters, FlowKey},
    proto,
};

use super::*;
use crate::{
    addr::to_addr6,
    datapath::{Capacities, Contents},
};

fn contents() -> Contents {
    let mut c = Contents::default();
    let dns_udp = ServiceKey::new(
        to_addr6("10.96.0.10".parse().unwrap()),
        53u16.to_be(),
        proto::UDP,
    );
    let web = ServiceKey::new(
        to_addr6("fd00::1".parse().unwrap()),
        80u16.to_be(),
        proto::TCP,
    );
    c.services.insert(
        dns_udp,
        ServiceValue {
            id: 1,
            count: 2,
            flags: 0,
            affinity_timeout_s: 0,
        },
    );
    c.services.insert(
        web,
        ServiceValue {
            id: 2,
            count: 1,
            flags: 0,
            affinity_timeout_s: 0,
        },
    );
    c.info
        .insert(1, ServiceInfo::new("kube-system", "dns", "dns").unwrap());
    c.info
        .insert(2, ServiceInfo::new("prod", "web", "").unwrap());
    c.backends
        .insert(1, crate::testutil::backend("10.0.0.1:53"));
    c.backends
        .insert(2, crate::testutil::backend("10.0.0.2:53"));
    c.backends
        .insert(3, crate::testutil::backend("[fd00::5]:8080"));
    c.slots.insert(lb_common::SlotKey { svc_id: 1, slot: 0 }, 1);
    c.slots.insert(lb_common::SlotKey { svc_id: 1, slot: 1 }, 2);
    c.slots.insert(lb_common::SlotKey { svc_id: 2, slot: 0 }, 3);
    c
}

#[test]
fn explain_reads_the_frontend_its_backends_and_how_one_is_picked() {
    let c = contents();
    let key = ServiceKey::new(
        to_addr6("10.96.0.10".parse().unwrap()),
        53u16.to_be(),
        proto::UDP,
    );
    let e = explain(&c, &key, "198.18.0.1:40000".parse().unwrap());
    assert_eq!(e.destination, "10.96.0.10:53/UDP");
    let s = e.socket.expect("a socket frontend");
    assert_eq!((s.service.as_str(), s.id), ("kube-system/dns", 1));
    let picks: Vec<(String, f64)> = s
        .backends
        .iter()
        .map(|p| (p.backend.unwrap().to_string(), p.percent))
        .collect();
    assert_eq!(
        picks,
        [
            ("10.0.0.1:53".to_string(), 50.0),
            ("10.0.0.2:53".to_string(), 50.0)
        ]
    );
    assert!(s.pick.contains("one of 2 slots at random"), "{}", s.pick);
    assert!(e.north_south.is_none());
    let text = explain_text(&explain(&c, &key, "198.18.0.1:40000".parse().unwrap()));
    assert!(text.contains("XDP: not a north-south frontend"), "{text}");
    // A verdict that rewrote the packet names where it goes.
    let f = crate::cli::packet::frame(
        proto::TCP,
        "1.1.1.1:1".parse().unwrap(),
        "2.2.2.2:2".parse().unwrap(),
        b"",
    );
    let g = crate::cli::packet::frame(
        proto::TCP,
        "3.3.3.3:3".parse().unwrap(),
        "4.4.4.4:4".parse().unwrap(),
        b"",
    );
    let run = xdp_run("eth0", 3, &f, &g);
    assert_eq!(run.verdict, "XDP_TX");
    assert_eq!(run.destination, Some("4.4.4.4:4".parse().unwrap()));
    assert_eq!(
        xdp_run("eth0", 2, &f, &f).meaning,
        "not translated: handed to the stack as it came"
    );
}

#[test]
fn affinity_entries_show_time_left_and_whether_they_are_honoured() {
    use lb_common::{AffinityKey, AffinityMatchKey, AffinityValue};
    let mut c = contents();
    for v in c.services.values_mut() {
        v.affinity_timeout_s = 100;
    }
    c.affinity_match.insert(AffinityMatchKey {
        svc_id: 1,
        backend_id: 2,
    });
    let entry = |svc_id, backend_id, last_used_s: u64| {
        (
            AffinityKey::new(svc_id, 7),
            AffinityValue {
                backend_id,
                _pad: 0,
                last_used_ns: last_used_s * 1_000_000_000,
            },
        )
    };
    let rows = affinity(
        &c,
        &[entry(1, 2, 970), entry(1, 1, 800), entry(9, 1, 999)],
        1_000_000_000_000,
    );
    let got: Vec<(Option<String>, u64, u64, bool)> = rows
        .iter()
        .map(|r| (r.frontend.clone(), r.idle_s, r.expires_in_s, r.honoured))
        .collect();
    assert_eq!(
        got,
        [
            (None, 1, 0, false),
            (Some("10.96.0.10:53/UDP".into()), 30, 70, true),
            (Some("10.96.0.10:53/UDP".into()), 200, 0, false),
        ]
    );
    assert!(affinity_table(&rows).contains("(gone)"));
}

#[test]
fn lists_services_by_name() {
    let rows = services(&contents());
    let names: Vec<_> = rows
        .iter()
        .map(|r| (r.service.as_str(), r.frontend.as_str(), r.backends))
        .collect();
    assert_eq!(
        names,
        [
            ("kube-system/dns", "10.96.0.10:53/UDP", 2),
            ("prod/web", "[fd00::1]:80/TCP", 1)
        ]
    );
    let text = services_table(&rows);
    assert!(text.starts_with("FRONTEND"), "{text}");
    assert!(text.contains("10.96.0.10:53/UDP"), "{text}");
}

#[test]
fn selects_by_name_and_by_frontend() {
    let c = contents();
    for sel in [
        "kube-system/dns",
        "10.96.0.10:53",
        "10.96.0.10:53/udp",
        "10.96.0.10:53/UDP",
    ] {
        let d = service_detail(&c, sel);
        assert_eq!(d.len(), 1, "{sel}");
        assert_eq!(
            d[0].slots
                .iter()
                .map(|s| s.backend.unwrap().to_string())
                .collect::<Vec<_>>(),
            ["10.0.0.1:53", "10.0.0.2:53"]
        );
    }
    assert_eq!(service_detail(&c, "10.96.0.10:53/TCP").len(), 0);
    assert_eq!(service_detail(&c, "[fd00::1]:80").len(), 1);
    assert_eq!(service_detail(&c, "nope/nope").len(), 0);
}

fn with_external() -> Contents {
    use lb_common::external::ExternalService;
    let mut c = contents();
    let lb = ServiceKey::new(
        to_addr6("198.51.100.1".parse().unwrap()),
        80u16.to_be(),
        proto::TCP,
    );
    let np = ServiceKey::new(
        to_addr6("192.0.2.1".parse().unwrap()),
        30080u16.to_be(),
        proto::TCP,
    );
    let v = ExternalService {
        id: 4,
        table_off: 7,
        table_size: 5,
        flags: EXTERNAL_F_LOCAL | EXTERNAL_F_SOURCE_RANGES,
        _pad: 0,
    };
    c.external.insert(lb, v);
    c.external.insert(
        np,
        ExternalService {
            flags: EXTERNAL_F_LOCAL,
            ..v
        },
    );
    c.tables.insert(7, vec![1, 2, 1, 2, 1]);
    c.external_info
        .insert(4, ServiceInfo::new("prod", "edge", "http").unwrap());
    c
}

#[test]
fn north_south_affinity_rows_follow_the_marks_and_the_timeout() {
    use lb_common::external::{
        ExternalAffinityKey, ExternalAffinityMatchKey, ExternalAffinityValue,
    };
    let mut c = with_external();
    let backend = lb_common::Endpoint::new(to_addr6("10.0.0.2".parse().unwrap()), 53u16.to_be());
    let gone = lb_common::Endpoint::new(to_addr6("10.0.0.9".parse().unwrap()), 53u16.to_be());
    c.external_match
        .insert(ExternalAffinityMatchKey { svc_id: 4, backend }, 100);
    let entry = |client: &str, backend, last_used| {
        (
            ExternalAffinityKey {
                svc_id: 4,
                client: to_addr6(client.parse().unwrap()),
            },
            ExternalAffinityValue {
                backend: lb_common::Backend::new(backend, lb_common::node::UNKNOWN),
                last_used,
            },
        )
    };
    let rows = external_affinity(
        &c,
        &[
            entry("203.0.113.7", backend, 970),
            entry("2001:db8::7", backend, 850),
            entry("203.0.113.8", gone, 990),
        ],
        1000,
    );
    let got: Vec<(&str, u64, u64, bool)> = rows
        .iter()
        .map(|r| (r.client.as_str(), r.idle_s, r.expires_in_s, r.honoured))
        .collect();
    assert_eq!(
        got,
        [
            ("2001:db8::7", 150, 0, false),
            ("203.0.113.7", 30, 70, true),
            // Its backend left the table (no mark): not honoured.
            ("203.0.113.8", 10, 0, false),
        ]
    );
    assert!(
        rows.iter()
            .all(|r| r.service == "prod/edge" && r.path == "north-south")
    );
    let text = affinity_table(&rows);
    assert!(
        text.contains("north-south") && text.contains("203.0.113.7"),
        "{text}"
    );
}

#[test]
fn north_south_frontends_tables_and_flows() {
    let c = with_external();
    let counters = BTreeMap::from([(
        4,
        ExternalCounters {
            packets: 10,
            bytes: 1000,
            flows: 2,
            drops: 1,
        },
    )]);
    let rows = external(&c, &counters);
    let view: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r.frontend.as_str(),
                r.policy.as_str(),
                r.source_ranges,
                r.backends,
            )
        })
        .collect();
    assert_eq!(
        view,
        [
            ("192.0.2.1:30080/TCP", "Local", false, 2),
            ("198.51.100.1:80/TCP", "Local", true, 2)
        ]
    );
    assert_eq!(rows[0].counters.packets, 10);
    assert!(external_table(&rows).contains("prod/edge"));

    let m = maglev(&c, "prod/edge");
    assert_eq!(m.len(), 1, "one table for both frontends");
    assert_eq!(m[0].frontends.len(), 2);
    let shares: Vec<_> = m[0]
        .shares
        .iter()
        .map(|s| (s.backend_id, s.entries))
        .collect();
    assert_eq!(shares, [(1, 3), (2, 2)]);
    assert!((m[0].shares[0].percent - 60.0).abs() < 1e-9);
    assert_eq!(maglev(&c, "198.51.100.1:80/TCP").len(), 1);
    assert!(maglev(&c, "prod/other").is_empty());
    assert!(maglev_text(&m).contains("60.00%"));

    let key = FlowKey::new(
        to_addr6("203.0.113.7".parse().unwrap()),
        to_addr6("198.51.100.1".parse().unwrap()),
        40000u16.to_be(),
        80u16.to_be(),
        proto::TCP,
    );
    let flags =
        lb_common::external::CT_SEEN | lb_common::external::TCP_SYN | lb_common::external::TCP_ACK;
    let ct = CtEntry {
        backend: lb_common::Endpoint::new(to_addr6("10.0.0.2".parse().unwrap()), 53u16.to_be()),
        svc_id: 4,
        snat_addr: to_addr6("192.0.2.1".parse().unwrap()),
        snat_port_be: 61000u16.to_be(),
        expires: 1100,
        created: 900,
        fwd_flags: flags,
        rev_flags: flags,
        changed_ms: 0,
    };
    let old = CtEntry {
        snat_port_be: 0,
        expires: 950,
        ..ct
    };
    let rows = flows(&c, &[(key, ct), (key, old)], 1000);
    assert_eq!(rows[0].backend.to_string(), "10.0.0.2:53");
    assert_eq!(rows[0].snat.unwrap().to_string(), "192.0.2.1:61000");
    assert_eq!(rows[0].service, "prod/edge");
    assert_eq!(
        (rows[0].state.as_str(), rows[0].age_s, rows[0].expires_in_s),
        ("established", 100, 100)
    );
    assert_eq!((rows[1].state.as_str(), rows[1].snat), ("expired", None));
    assert!(flows_table(&rows).contains("expired"));
}

#[test]
fn backends_count_their_slots_and_json_is_stable() {
    let rows = backends(&contents());
    assert_eq!(rows.iter().map(|r| r.slots).collect::<Vec<_>>(), [1, 1, 1]);
    let json = serde_json::to_value(service_detail(&contents(), "prod/web")).unwrap();
    assert_eq!(json[0]["frontend"], "[fd00::1]:80/TCP");
    assert_eq!(json[0]["slots"][0]["backend"], "[fd00::5]:8080");
}

#[test]
fn capacity_shows_each_maps_fill_and_flag() {
    use lb_common::maps;
    let mut c = contents();
    c.tables.insert(0, vec![1; 251]);
    c.tables.insert(251, vec![2; 509]);
    let caps = Capacities {
        services: 4,
        slots: 10,
        backends: 8,
        affinity_match: 10,
        external: 10,
        external_ids: 4,
        table_entries: 1000,
        ranges: 5,
        external_match: 10,
    };
    let rows = capacity(&c, &caps, &[(maps::CONNTRACK, 3, 12)]);
    let of = |m: &str| rows.iter().find(|r| r.map == m).unwrap().clone();
    assert_eq!(of(maps::SERVICES).entries, c.services.len() as u64);
    assert_eq!(of(maps::SERVICES).capacity, 4);
    let rings = of(maps::TABLES);
    assert_eq!((rings.entries, rings.fill_percent), (760, 76.0));
    assert_eq!(rings.flag, "--maglev-table-entries");
    // A changed table is written beside the one it replaces: room for the largest.
    assert_eq!(rings.needed, 760 + 509);
    let largest = c
        .services
        .values()
        .map(|v| u64::from(v.count))
        .max()
        .unwrap();
    assert_eq!(of(maps::SLOTS).needed, c.slots.len() as u64 + largest);
    assert_eq!(of(maps::BACKENDS).needed, c.backends.len() as u64);
    let ct = of(maps::CONNTRACK);
    assert_eq!((ct.fill_percent, ct.flag.as_str()), (25.0, "--max-flows"));
    let text = capacity_table(&rows);
    assert!(
        text.contains("lb_ring_v2") && text.contains("76.0%"),
        "{text}"
    );
}
