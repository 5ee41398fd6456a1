//! Benchmark 1 for XDP: the program's cost per packet against the number of services, with
//! `BPF_PROG_TEST_RUN`.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
};

use lb_common::{
    Backend, Endpoint, ServiceInfo, ServiceKey,
    external::{CtEntry, EXTERNAL_F_LOCAL, ExternalService, FlowKey},
    node, proto,
};
use lb_tests::{
    bench::Report,
    netns::Netns,
    packet::{self, TCP},
    world::{new_tag, pin_dir_of},
};
use lb_userspace::{
    addr::to_addr6,
    datapath::{Datapath as _, Op, bpf::read_lru},
    loader::{Device, Loaded, MapSizes, PinLayout, TC_PROGRAM, XDP_PASS_PROGRAM, XDP_PROGRAM},
};

use crate::{Plan, progress};

/// The frontend of service `i` of the XDP benchmark: 100.64.0.0/10 + i, port 80.
pub(super) fn xdp_frontend(i: u64) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i as u32)
}

pub(super) fn xdp_cost(report: &mut Report, plan: &Plan) {
    let id = "1-program-cost";
    let tag = new_tag();
    let ns = Netns::create(&format!("{tag}-x")).expect("ip netns add");
    let pins = pin_dir_of(&tag);
    let wire = || -> std::io::Result<()> {
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        ns.ip(&[
            "link", "add", "ext0", "type", "veth", "peer", "name", "ext1",
        ])?;
        ns.sysctl("net/ipv6/conf/ext1/disable_ipv6", "1")?;
        for dev in ["ext0", "ext1"] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        ns.addr("ext0", "192.0.2.1/24")?;
        ns.ip(&[
            "neigh",
            "replace",
            "192.0.2.254",
            "lladdr",
            "02:00:00:00:00:fe",
            "dev",
            "ext0",
            "nud",
            "permanent",
        ])?;
        ns.route("100.64.0.0/10", "192.0.2.254")?;
        ns.route("203.0.113.0/24", "192.0.2.254")
    };
    wire().expect("wiring the XDP benchmark namespace");
    let max = *plan.xdp_scales.iter().max().unwrap_or(&1);
    let path = ns.path();
    let results = std::thread::scope(|s| {
        s.spawn(|| {
            let file = fs::File::open(&path).expect("netns file");
            // SAFETY: setns on this thread only, with a valid namespace fd.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            xdp_cost_in_netns(plan, &pins, max)
        })
        .join()
    });
    let _ = fs::remove_dir_all(&pins);
    drop(ns);
    let Ok(results) = results else {
        report
            .notes
            .push("1 (XDP program cost) failed; see the log".into());
        return;
    };
    for (scale, variant, what, reps) in results {
        report.add(id, scale, variant, what, "ns/run", reps);
    }
    let m = |scale, v| {
        report
            .median(id, scale, v, "xdp, established flow")
            .unwrap_or(f64::NAN)
    };
    let (one, top, empty) = (m(1, "ours"), m(max, "ours"), m(1, "EMPTY"));
    report.goal(
        id,
        &format!("XDP {max}/1 services ratio <= 1.15 (O(1))"),
        format!("{:.2}", top / one),
        top / one <= 1.15,
    );
    report.goal(
        id,
        "XDP program within EMPTY + 60 ns",
        format!("EMPTY + {:.0} ns", top - empty),
        top - empty <= 60.0,
    );
}

/// Loads the object in this thread's namespace, programs `max` services step by step and
/// times the program at each scale of the plan.
pub(super) fn xdp_cost_in_netns(
    plan: &Plan,
    pins: &std::path::Path,
    max: u64,
) -> Vec<(u64, &'static str, &'static str, Vec<f64>)> {
    const TABLE: u32 = 13;
    let layout = PinLayout::new(pins);
    let sizes = MapSizes {
        services: 16,
        slots: 16,
        backends: (max * 10 + 16) as u32,
        rev_nat: 16,
        affinity: 16,
        external: (max + 16) as u32,
        external_ids: (max + 16) as u32,
        table_entries: ((max + 1) * u64::from(TABLE)) as u32,
        flows: 1024,
        new_flows: 1024,
        source_ranges: 16,
    };
    let mut loaded = Loaded::load(&layout, &sizes, (61000, 65535)).expect("the programs load");
    let ext0 = lb_userspace::agent::netdev::ifindex("ext0").expect("ext0");
    loaded
        .attach_device(
            &Device {
                name: "ext0".into(),
                ifindex: ext0,
            },
            aya::programs::XdpMode::Skb,
        )
        .expect("attaching to ext0");
    let mut dp = loaded.datapath().expect("maps");
    let mut results = Vec::new();
    let mut programmed = 0u64;
    // The measured flow: a client to service 0. Its backends are the frontend itself, so the
    // translation leaves the frame as it was and every repetition does the whole work.
    let client: SocketAddr = "203.0.113.7:40000".parse().expect("address");
    let target = SocketAddr::new(xdp_frontend(0).into(), 80);
    let syn = packet::tcp_frame(client, target, packet::SYN, b"");
    let ack = packet::tcp_frame(client, target, packet::ACK, b"");
    let other = packet::frame(TCP, client, "192.0.2.1:22".parse().expect("address"), b"");
    for &scale in &plan.xdp_scales {
        progress(&format!("1: XDP program cost at {scale} services"));
        while programmed < scale {
            let i = programmed;
            let id = (i + 1) as u32;
            let frontend = xdp_frontend(i);
            let mut ops = Vec::new();
            for b in 0..10u32 {
                let ep = if i == 0 {
                    Endpoint::new(to_addr6(frontend.into()), 80u16.to_be())
                } else {
                    let ip = Ipv4Addr::from(
                        u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i as u32) * 10 + b,
                    );
                    Endpoint::new(to_addr6(ip.into()), 8080u16.to_be())
                };
                // Where it runs is left unknown: the route decides, as before the field.
                ops.push(Op::PutBackend(id * 10 + b, Backend::new(ep, node::UNKNOWN)));
            }
            let start = (i as u32) * TABLE;
            ops.push(Op::PutTable {
                start,
                at: 0,
                ids: (0..TABLE).map(|k| id * 10 + k % 10).collect(),
            });
            ops.push(Op::PutExternalInfo(
                id,
                ServiceInfo::new("bench", &format!("s{i}"), "http").expect("short"),
            ));
            ops.push(Op::PutExternal(
                ServiceKey::new(to_addr6(frontend.into()), 80u16.to_be(), proto::TCP),
                ExternalService {
                    id,
                    table_off: start,
                    table_size: TABLE,
                    flags: EXTERNAL_F_LOCAL,
                    _pad: 0,
                },
            ));
            for op in &ops {
                dp.apply(op).expect("programming the benchmark services");
            }
            programmed += 1;
        }
        progress(&format!("   {scale} services programmed"));
        // The handshake: the SYN creates the flow (among new flows), the backend's answer
        // (through tc egress: the backend is local) and the client's ACK make it answered.
        // The first run also sets the MAC addresses the FIB gives; from then on the program
        // leaves the frame as it is.
        loaded
            .test_run(XDP_PROGRAM, &syn, ext0, 1)
            .expect("test run");
        let answer = packet::tcp_frame(target, client, packet::SYN | packet::ACK, b"");
        loaded
            .test_run(TC_PROGRAM, &answer, 0, 1)
            .expect("test run");
        let frame = loaded
            .test_run(XDP_PROGRAM, &ack, ext0, 1)
            .expect("test run")
            .frame;
        let answered: Vec<(FlowKey, CtEntry)> =
            read_lru(&layout, lb_common::maps::CONNTRACK, 10).expect("conntrack");
        assert_eq!(answered.len(), 1, "the measured flow is an answered one");
        let again = loaded
            .test_run(XDP_PROGRAM, &frame, ext0, 1)
            .expect("test run");
        assert_eq!(
            (again.verdict, &again.frame),
            (3, &frame),
            "the benchmark packet stays as it is (XDP_TX)"
        );
        let time = |loaded: &mut Loaded, program, f: &[u8]| -> Vec<f64> {
            (0..plan.reps)
                .map(|_| {
                    let out = loaded
                        .test_run(program, f, ext0, plan.test_runs)
                        .expect("test run");
                    out.duration.as_secs_f64() * 1e9
                })
                .collect()
        };
        results.push((
            scale,
            "ours",
            "xdp, established flow",
            time(&mut loaded, XDP_PROGRAM, &frame),
        ));
        results.push((
            scale,
            "EMPTY",
            "xdp, established flow",
            time(&mut loaded, XDP_PASS_PROGRAM, &frame),
        ));
        results.push((
            scale,
            "ours",
            "xdp, not a service",
            time(&mut loaded, XDP_PROGRAM, &other),
        ));
    }
    results
}
