//! The north-south programs (`xdp_lb`, `tc_egress`) run with BPF_PROG_TEST_RUN on crafted
//! frames, against maps programmed by the real pipeline (manifests -> store -> model ->
//! reconciler -> pinned maps). The kernel runs the programs in a network namespace of the
//! test's own (routes, neighbours and devices for the FIB lookups; no route out), and the
//! test checks every rewritten frame's addresses, ports, MACs and checksums, the checksums
//! recomputed here from scratch.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use lb_common::{
    external::{CT_PORT_GRACE_MS, CtEntry, FlowKey, FlowRevNat},
    maps, stats as st,
};
use lb_tests::{
    manifest::{Ep, slice},
    netns::Netns,
    packet::{self, ACK, FIN, L3, Parsed, RST, SYN, TCP, UDP, frame, tcp_frame},
    require_privileges,
    world::{new_tag, pin_dir_of},
};
use lb_userspace::{
    cli::{self, FlowRow},
    datapath::bpf::{BpfDatapath, read_flows, read_lru, read_stats},
    datapath::conntrack::{Owners, Sweeper, clock_now},
    k8s::ObjectRef,
    k8s::source::file::{Document, parse_manifest},
    k8s::store::{Snapshot, Store, Update},
    loader::{
        Device, Loaded, MapSizes, OVERLAY_PROGRAM, PinLayout, Settings, TC_PROGRAM, XDP_PROGRAM,
    },
    model::Limits,
    reconcile::Reconciler,
};
use serde_json::json;

const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
const XDP_TX: i32 = 3;
const TCX_NEXT: i32 = -1;
const TC_ACT_REDIRECT: i32 = 7;

const EXT_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, i]
}

fn mac_text(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The test's node: a namespace with an external device `ext0` (192.0.2.1/24,
/// 2001:db8:1::1/64; clients 203.0.113.0/24 and 2001:db8:9::/64 behind 192.0.2.254 and
/// 2001:db8:1::fe; remote backends 192.0.2.50.. and 2001:db8:1::50.. on the same link) and a
/// pod device `pod0` (10.244.0.1/24, a local pod 10.244.0.10), the programs loaded with
/// their maps pinned in a directory of the test's own.
struct Node {
    ns: Netns,
    pins: PathBuf,
}

impl Node {
    fn new() -> Self {
        let tag = new_tag();
        let ns = Netns::create(&format!("{tag}-x")).expect("ip netns add");
        let node = Self {
            ns,
            pins: pin_dir_of(&tag),
        };
        node.wire().expect("wiring the node namespace");
        node
    }

    fn wire(&self) -> std::io::Result<()> {
        let ns = &self.ns;
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        ns.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        ns.ip(&[
            "link", "add", "ext0", "type", "veth", "peer", "name", "ext1",
        ])?;
        ns.ip(&[
            "link", "add", "pod0", "type", "veth", "peer", "name", "pod1",
        ])?;
        // The peers stay silent (no IPv6 router or multicast listener messages), so the only
        // packets the attached XDP program sees are the test's.
        for dev in ["ext1", "pod1"] {
            ns.sysctl(&format!("net/ipv6/conf/{dev}/disable_ipv6"), "1")?;
        }
        for dev in ["ext0", "ext1", "pod0", "pod1"] {
            ns.ip(&["link", "set", dev, "up"])?;
        }
        ns.addr("ext0", "192.0.2.1/24")?;
        ns.addr("ext0", "2001:db8:1::1/64")?;
        ns.addr("pod0", "10.244.0.1/24")?;
        let neigh = |ip: &str, mac: [u8; 6], dev: &str| {
            ns.ip(&[
                "neigh",
                "replace",
                ip,
                "lladdr",
                &mac_text(mac),
                "dev",
                dev,
                "nud",
                "permanent",
            ])
        };
        neigh("192.0.2.254", EXT_GW_MAC, "ext0")?;
        neigh("2001:db8:1::fe", EXT_GW_MAC, "ext0")?;
        for i in 0..8u8 {
            neigh(&format!("192.0.2.{}", 50 + i), backend_mac(i), "ext0")?;
            neigh(&format!("2001:db8:1::{}", 50 + i), backend_mac(i), "ext0")?;
        }
        for i in [10u8, 20, 21] {
            neigh(&format!("10.244.0.{i}"), [0x02, 0, 0, 0, 2, i], "pod0")?;
        }
        ns.route("203.0.113.0/24", "192.0.2.254")?;
        ns.route("2001:db8:9::/64", "2001:db8:1::fe")
    }

    /// Runs `f` on a thread inside the node's namespace (the kernel runs test programs and
    /// their FIB lookups in the caller's namespace).
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let path = self.ns.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = fs::File::open(&path).expect("netns file");
                // SAFETY: setns on this thread only, with a valid namespace fd.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.pins)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup: {}: {e}", self.pins.display());
        }
    }
}

/// The programs and the pipeline that programs their maps.
struct Lab {
    settings: Settings,
    loaded: Loaded,
    reconciler: Reconciler<BpfDatapath>,
    store: Store,
    layout: PinLayout,
    ext0: u32,
}

fn lab_sizes() -> MapSizes {
    MapSizes {
        services: 64,
        slots: 1024,
        backends: 256,
        rev_nat: 1024,
        affinity: 1024,
        external: 64,
        external_ids: 16,
        table_entries: 16 * 251,
        flows: 4096,
        new_flows: 4096,
        source_ranges: 64,
    }
}

impl Lab {
    fn new(pins: &PathBuf) -> Self {
        Self::with(pins, &Settings::default())
    }

    fn with(pins: &PathBuf, settings: &Settings) -> Self {
        let layout = PinLayout::new(pins);
        let mut loaded = Loaded::load_with(&layout, &lab_sizes(), settings)
            .expect("the programs pass the verifier");
        let ext0 = lb_userspace::agent::netdev::ifindex("ext0").expect("ext0 exists");
        // Attaching for real also marks ext0 as a device XDP may send out of.
        loaded
            .attach_device(
                &Device {
                    name: "ext0".into(),
                    ifindex: ext0,
                },
                aya::programs::XdpMode::Default,
            )
            .expect("XDP and tc attach to a veth");
        let dp = loaded.datapath().expect("maps");
        let limits = Limits {
            max_backends_per_service: 64,
            max_frontends_per_service: 4096,
            max_table_size: 251,
            entries_per_backend: 100,
        };
        let reconciler = Reconciler::new(dp, limits).expect("reconciler");
        let mut store = Store::new(Some("node-a".into()));
        store.set_addresses(vec![
            "192.0.2.1".parse().unwrap(),
            "2001:db8:1::1".parse().unwrap(),
        ]);
        Self {
            settings: *settings,
            loaded,
            reconciler,
            store,
            layout,
            ext0,
        }
    }

    /// Programs exactly the objects of `manifests`.
    fn program(&mut self, manifests: &[String]) {
        let mut snapshot = Snapshot::default();
        for m in manifests {
            for doc in parse_manifest(m).expect("manifest parses") {
                match doc {
                    Document::Object(lb_userspace::k8s::store::Object::Service(s)) => {
                        snapshot.services.push(*s);
                    }
                    Document::Object(lb_userspace::k8s::store::Object::EndpointSlice(s)) => {
                        snapshot.slices.push(*s);
                    }
                    other => panic!("unexpected document {other:?}"),
                }
            }
        }
        let dirty = self.store.update(Update::Snapshot(snapshot));
        let all: BTreeSet<ObjectRef> = dirty
            .into_iter()
            .chain(self.store.service_refs().cloned())
            .collect();
        let mut report = self.reconciler.sync(&self.store, all);
        // What the change switched away from (the removed backends) goes once no packet
        // can still be using it, as the agent does a few milliseconds later.
        report.merge(self.reconciler.retire_now());
        assert!(
            report.rejected.is_empty(),
            "rejected: {:?}",
            report.rejected
        );
        assert!(
            report.errors.is_empty(),
            "write errors: {:?}",
            report.errors
        );
        assert!(report.full.is_empty(), "full: {:?}", report.full);
    }

    fn xdp(&mut self, f: &[u8]) -> (i32, Vec<u8>) {
        let out = self
            .loaded
            .test_run(XDP_PROGRAM, f, self.ext0, 1)
            .expect("test run");
        (out.verdict, out.frame)
    }

    fn tc(&mut self, f: &[u8]) -> (i32, Vec<u8>) {
        let out = self.loaded.test_run(TC_PROGRAM, f, 0, 1).expect("test run");
        (out.verdict, out.frame)
    }

    /// Runs the overlay program on `f` as if it arrived on device `ifindex`.
    fn overlay(&mut self, f: &[u8], ifindex: u32) -> (i32, Vec<u8>) {
        let out = self
            .loaded
            .test_run(OVERLAY_PROGRAM, f, ifindex, 1)
            .expect("test run");
        (out.verdict, out.frame)
    }

    /// Runs XDP on a frame that must be translated and sent with `verdict`; the result,
    /// parsed with its checksums verified.
    fn translated(&mut self, f: &[u8], verdict: i32) -> Parsed {
        let (v, out) = self.xdp(f);
        assert_eq!(
            v,
            verdict,
            "verdict for {:?}: left as {:?}; counters {:?}",
            packet::parse(f),
            packet::parse(&out),
            lb_userspace::cli::stats(&self.stats())
                .into_iter()
                .filter(|(_, v)| *v != 0)
                .collect::<Vec<_>>()
        );
        packet::parse(&out).unwrap_or_else(|e| panic!("translated frame: {e}"))
    }

    fn stats(&self) -> Vec<u64> {
        read_stats(&self.layout).expect("stats")
    }

    fn stat(&self, idx: u32) -> u64 {
        self.stats()[idx as usize]
    }

    /// The programs loaded again over the same maps, their clock `secs` ahead: how the
    /// flows look to packets that come that much later.
    fn later(&self, secs: u32) -> Loaded {
        let settings = Settings {
            clock_offset: secs,
            ..self.settings
        };
        Loaded::load_with(&self.layout, &lab_sizes(), &settings).expect("loads again")
    }

    /// The tracked flows as `lbctl conntrack` shows them, `secs` ahead.
    fn flows(&self, secs: u32) -> Vec<FlowRow> {
        let entries = read_flows(&self.layout, 100_000).expect("conntrack");
        cli::flows(self.reconciler.contents(), &entries, clock_now(secs))
    }

    /// The tracked flow from `client`.
    fn flow(&self, client: SocketAddr, secs: u32) -> FlowRow {
        self.flows(secs)
            .into_iter()
            .find(|f| f.client == client)
            .unwrap_or_else(|| panic!("no flow from {client}"))
    }
}

/// Runs XDP in `loaded` (see [`Lab::later`]).
fn xdp_in(loaded: &mut Loaded, ifindex: u32, f: &[u8]) -> (i32, Vec<u8>) {
    let out = loaded
        .test_run(XDP_PROGRAM, f, ifindex, 1)
        .expect("test run");
    (out.verdict, out.frame)
}

fn ports(list: &[(&str, u16, &str, u16, u16)]) -> serde_json::Value {
    list.iter()
        .map(|(name, port, proto, target, node_port)| {
            json!({"name": name, "port": port, "protocol": proto, "targetPort": target,
                   "nodePort": node_port})
        })
        .collect()
}

fn service(ns_name: (&str, &str), spec: serde_json::Value, status: serde_json::Value) -> String {
    serde_json::to_string_pretty(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns_name.0, "name": ns_name.1},
        "spec": spec,
        "status": status,
    }))
    .unwrap()
}

/// `web`: NodePort, dual-stack, Cluster policy, remote backends; `lb`: LoadBalancer with
/// Local policy, source ranges and one local and one remote endpoint; `ext`: an external IP
/// with Local policy and no local endpoint.
fn manifests(web_backends: &[u8]) -> Vec<String> {
    manifests_with(web_spec(), web_backends)
}

/// The spec of `web` (see [`manifests`]).
fn web_spec() -> serde_json::Value {
    json!({
        "type": "NodePort",
        "clusterIPs": ["10.96.0.10", "fd00:96::10"], "clusterIP": "10.96.0.10",
        "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
        "ports": ports(&[("http", 80, "TCP", 8080, 30080), ("dns", 53, "UDP", 5353, 30053)]),
    })
}

/// [`manifests`] with `web`'s spec given.
fn manifests_with(web_spec: serde_json::Value, web_backends: &[u8]) -> Vec<String> {
    let web = service(("shop", "web"), web_spec, json!({}));
    let web_ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    let eps4: Vec<Ep> = web_backends
        .iter()
        .map(|i| Ep::ready(format!("192.0.2.{}", 50 + i)).on_node("node-b"))
        .collect();
    let eps6: Vec<Ep> = web_backends
        .iter()
        .map(|i| Ep::ready(format!("2001:db8:1::{}", 50 + i)).on_node("node-b"))
        .collect();
    let lb = service(
        ("shop", "lb"),
        json!({
            "type": "LoadBalancer", "clusterIP": "10.96.0.11", "clusterIPs": ["10.96.0.11"],
            "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
            "loadBalancerSourceRanges": ["203.0.113.0/24"],
            "ports": ports(&[("https", 443, "TCP", 8443, 30443)]),
        }),
        json!({"loadBalancer": {"ingress": [{"ip": "198.51.100.10"}]}}),
    );
    let ext = service(
        ("shop", "ext"),
        json!({
            "type": "ClusterIP", "clusterIP": "10.96.0.12", "clusterIPs": ["10.96.0.12"],
            "externalIPs": ["198.51.100.20"], "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }),
        json!({}),
    );
    vec![
        web,
        slice("shop", "web-4", "web", "IPv4", &web_ports, &eps4),
        slice("shop", "web-6", "web", "IPv6", &web_ports, &eps6),
        lb,
        slice(
            "shop",
            "lb-1",
            "lb",
            "IPv4",
            &[("https", 8443, "TCP")],
            &[
                Ep::ready("10.244.0.10").on_node("node-a"),
                Ep::ready("192.0.2.51").on_node("node-b"),
            ],
        ),
        ext,
        slice(
            "shop",
            "ext-1",
            "ext",
            "IPv4",
            &[("http", 8080, "TCP")],
            &[Ep::ready("192.0.2.52").on_node("node-b")],
        ),
    ]
}

fn in_snat_range(p: u16) -> bool {
    (61000..=65535).contains(&p)
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn the_kernel_object_of_the_default_build_loads() {
    require_privileges("the_kernel_object_of_the_default_build_loads");
    // `cargo xtask build-ebpf` without --release; `cargo xtask test` builds it there.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/lb-ebpf-dev.o");
    let Ok(object) = fs::read(&path) else {
        println!(
            "SKIPPED: {} is not built (cargo xtask test builds it)",
            path.display()
        );
        return;
    };
    let layout = PinLayout::new(pin_dir_of(&new_tag()));
    let loaded = Loaded::load_object(&object, &layout, &lab_sizes(), &Settings::default());
    let verdict = loaded.as_ref().map(drop).map_err(ToString::to_string);
    drop(loaded);
    lb_userspace::loader::cleanup(&layout).expect("cleanup");
    assert_eq!(verdict, Ok(()), "the default build passes the verifier");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn xdp_and_tc_translate_each_service_kind_with_valid_checksums() {
    require_privileges("xdp_and_tc_translate_each_service_kind_with_valid_checksums");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0]));
        let before = lab.stats();

        // NodePort, Cluster policy, remote backend: DNAT to the backend, SNAT to the node's
        // address on the egress route, out of the same device (XDP_TX) with the FIB's MACs.
        for (proto, client, frontend, backend, node_ip) in [
            (
                TCP,
                "203.0.113.7:40000",
                "192.0.2.1:30080",
                "192.0.2.50:8080",
                "192.0.2.1",
            ),
            (
                UDP,
                "203.0.113.7:40000",
                "192.0.2.1:30053",
                "192.0.2.50:5353",
                "192.0.2.1",
            ),
            (
                TCP,
                "[2001:db8:9::7]:40000",
                "[2001:db8:1::1]:30080",
                "[2001:db8:1::50]:8080",
                "2001:db8:1::1",
            ),
            (
                UDP,
                "[2001:db8:9::7]:40000",
                "[2001:db8:1::1]:30053",
                "[2001:db8:1::50]:5353",
                "2001:db8:1::1",
            ),
        ] {
            let syn = frame(proto, sa(client), sa(frontend), b"ping");
            let out = lab.translated(&syn, XDP_TX);
            assert_eq!(out.dst, sa(backend), "{frontend}/{proto}");
            assert_eq!(out.src.ip(), node_ip.parse::<IpAddr>().unwrap());
            assert!(
                in_snat_range(out.src.port()),
                "SNAT port {}",
                out.src.port()
            );
            assert_eq!(out.dmac, backend_mac(0));
            assert_eq!(out.payload, b"ping");
            // The flow's next packet takes the same backend and SNAT port.
            assert_eq!(lab.translated(&syn, XDP_TX), out);
            // The backend's reply to the SNAT address comes back as the frontend's, towards
            // the client through its gateway.
            let reply = frame(proto, out.dst, out.src, b"pong");
            let back = lab.translated(&reply, XDP_TX);
            assert_eq!((back.src, back.dst), (sa(frontend), sa(client)));
            assert_eq!(back.dmac, EXT_GW_MAC);
            assert_eq!(back.payload, b"pong");
        }

        // LoadBalancer IP, Local policy: only the local endpoint, the client's address kept,
        // handed to the stack (the pod device runs no XDP).
        let client = sa("203.0.113.7:40001");
        let to_lb = frame(TCP, client, sa("198.51.100.10:443"), b"hi");
        let out = lab.translated(&to_lb, XDP_PASS);
        assert_eq!((out.src, out.dst), (client, sa("10.244.0.10:8443")));
        // Its node port too.
        let to_np = frame(TCP, sa("203.0.113.8:40002"), sa("192.0.2.1:30443"), b"");
        let out = lab.translated(&to_np, XDP_PASS);
        assert_eq!(
            (out.src, out.dst),
            (sa("203.0.113.8:40002"), sa("10.244.0.10:8443"))
        );

        // The local pod's reply leaves by ext0, where tc egress restores the frontend.
        let reply = frame(TCP, sa("10.244.0.10:8443"), client, b"ho");
        let (verdict, out) = lab.tc(&reply);
        assert_eq!(verdict, TCX_NEXT);
        let out = packet::parse(&out).expect("valid checksums after tc");
        assert_eq!((out.src, out.dst), (sa("198.51.100.10:443"), client));
        assert_eq!(out.payload, b"ho");
        // A client port in the SNAT range: XDP leaves the flow's replies to tc, and a
        // spoofed "reply" arriving from outside passes untouched.
        let high = sa("203.0.113.7:65000");
        let out = lab.translated(&frame(TCP, high, sa("198.51.100.10:443"), b""), XDP_PASS);
        assert_eq!(out.dst, sa("10.244.0.10:8443"));
        let spoofed = frame(TCP, sa("10.244.0.10:8443"), high, b"");
        assert_eq!(lab.xdp(&spoofed), (XDP_PASS, spoofed.clone()));
        let (_, out) = lab.tc(&spoofed);
        assert_eq!(
            packet::parse(&out).expect("valid").src,
            sa("198.51.100.10:443")
        );
        // Other traffic leaving the node is untouched by tc.
        let other = frame(TCP, sa("10.244.0.10:8443"), sa("203.0.113.99:5000"), b"x");
        assert_eq!(lab.tc(&other), (TCX_NEXT, other.clone()));

        // loadBalancerSourceRanges: a source outside them is dropped at the LB IP.
        let outsider = frame(TCP, sa("192.0.2.99:40000"), sa("198.51.100.10:443"), b"");
        assert_eq!(lab.xdp(&outsider).0, XDP_DROP);
        // ... but the node port of the same service does not filter (as kube-proxy).
        let outsider_np = frame(TCP, sa("192.0.2.99:40000"), sa("192.0.2.1:30443"), b"");
        assert_eq!(lab.xdp(&outsider_np).0, XDP_PASS);

        // An external IP with Local policy and no endpoint on this node: dropped.
        let no_local = frame(TCP, sa("203.0.113.7:40003"), sa("198.51.100.20:8080"), b"");
        assert_eq!(lab.xdp(&no_local).0, XDP_DROP);

        // Not a frontend: passed untouched.
        for f in [
            frame(TCP, sa("203.0.113.7:40000"), sa("192.0.2.1:22"), b"ssh"),
            frame(
                UDP,
                sa("203.0.113.7:40000"),
                sa("192.0.2.1:30080"),
                b"wrong protocol",
            ),
            frame(
                TCP,
                sa("203.0.113.7:40000"),
                sa("192.0.2.2:30080"),
                b"not a node address",
            ),
        ] {
            assert_eq!(lab.xdp(&f), (XDP_PASS, f.clone()));
        }

        let after = lab.stats();
        let delta = |i: u32| after[i as usize] - before[i as usize];
        // Four flows twice each, the LB IP from two clients, the node port and the outsider
        // at the node port.
        assert_eq!(delta(st::XDP_TRANSLATED), 4 * 2 + 4);
        assert_eq!(delta(st::XDP_REVERSED), 4);
        assert_eq!(delta(st::TC_REVERSED), 2);
        assert_eq!(delta(st::XDP_DROP_SOURCE_RANGE), 1);
        assert_eq!(delta(st::XDP_DROP_NO_BACKEND), 1);
        assert_eq!(delta(st::XDP_REDIRECTED), 4 * 3);
        // The Local service's packets went to the stack, for the local pod.
        assert_eq!(delta(st::XDP_TO_STACK), 4);
    });
}

/// What one packet's run of the XDP program must give: its verdict, where the frame goes
/// (`None`: untouched), and the counters it moves, by exactly these amounts (every other
/// counter stays), as Katran's and Cilium's BPF test tables do.
struct Case {
    what: &'static str,
    proto: u8,
    client: &'static str,
    frontend: &'static str,
    verdict: i32,
    /// The rewritten source (`Snat(ip)`: that address, a port of the SNAT range) and
    /// destination, or `None` for a frame passed untouched.
    out: Option<(Source, &'static str)>,
    counters: &'static [(u32, u64)],
}

/// The source a translated frame leaves with.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// The client's own.
    Client,
    /// This node's address, with a port of the SNAT range.
    Snat(&'static str),
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn xdp_happy_paths_as_a_fixture_table() {
    require_privileges("xdp_happy_paths_as_a_fixture_table");
    let cases = [
        Case {
            what: "node port, Cluster policy, remote backend: DNAT and SNAT, out again",
            proto: TCP,
            client: "203.0.113.7:41000",
            frontend: "192.0.2.1:30080",
            verdict: XDP_TX,
            out: Some((Source::Snat("192.0.2.1"), "192.0.2.50:8080")),
            counters: &[(st::XDP_TRANSLATED, 1), (st::XDP_REDIRECTED, 1)],
        },
        Case {
            what: "the same over UDP",
            proto: UDP,
            client: "203.0.113.7:41001",
            frontend: "192.0.2.1:30053",
            verdict: XDP_TX,
            out: Some((Source::Snat("192.0.2.1"), "192.0.2.50:5353")),
            counters: &[(st::XDP_TRANSLATED, 1), (st::XDP_REDIRECTED, 1)],
        },
        Case {
            what: "the same over IPv6",
            proto: TCP,
            client: "[2001:db8:9::7]:41002",
            frontend: "[2001:db8:1::1]:30080",
            verdict: XDP_TX,
            out: Some((Source::Snat("2001:db8:1::1"), "[2001:db8:1::50]:8080")),
            counters: &[(st::XDP_TRANSLATED, 1), (st::XDP_REDIRECTED, 1)],
        },
        Case {
            what: "load-balancer IP, Local policy: the local pod, the client's address kept",
            proto: TCP,
            client: "203.0.113.7:41003",
            frontend: "198.51.100.10:443",
            verdict: XDP_PASS,
            out: Some((Source::Client, "10.244.0.10:8443")),
            counters: &[(st::XDP_TRANSLATED, 1), (st::XDP_TO_STACK, 1)],
        },
        Case {
            what: "the Local service's node port",
            proto: TCP,
            client: "203.0.113.8:41004",
            frontend: "192.0.2.1:30443",
            verdict: XDP_PASS,
            out: Some((Source::Client, "10.244.0.10:8443")),
            counters: &[(st::XDP_TRANSLATED, 1), (st::XDP_TO_STACK, 1)],
        },
        Case {
            what: "a client outside loadBalancerSourceRanges: dropped",
            proto: TCP,
            client: "192.0.2.99:41005",
            frontend: "198.51.100.10:443",
            verdict: XDP_DROP,
            out: None,
            counters: &[(st::XDP_DROP_SOURCE_RANGE, 1)],
        },
        Case {
            what: "an external IP, Local policy, no endpoint on this node: dropped",
            proto: TCP,
            client: "203.0.113.7:41006",
            frontend: "198.51.100.20:8080",
            verdict: XDP_DROP,
            out: None,
            counters: &[(st::XDP_DROP_NO_BACKEND, 1)],
        },
        Case {
            what: "not a frontend: passed untouched, nothing counted",
            proto: TCP,
            client: "203.0.113.7:41007",
            frontend: "192.0.2.1:22",
            verdict: XDP_PASS,
            out: None,
            counters: &[],
        },
        Case {
            what: "a frontend's port over the other protocol: untouched",
            proto: UDP,
            client: "203.0.113.7:41008",
            frontend: "192.0.2.1:30080",
            verdict: XDP_PASS,
            out: None,
            counters: &[],
        },
    ];
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0]));
        for c in &cases {
            let input = frame(c.proto, sa(c.client), sa(c.frontend), b"payload");
            let before = lab.stats();
            let (verdict, output) = lab.xdp(&input);
            let after = lab.stats();
            assert_eq!(verdict, c.verdict, "{}", c.what);
            match c.out {
                None => assert_eq!(output, input, "{}: untouched", c.what),
                Some((source, dst)) => {
                    let out = packet::parse(&output)
                        .unwrap_or_else(|e| panic!("{}: valid checksums: {e}", c.what));
                    assert_eq!(out.dst, sa(dst), "{}", c.what);
                    assert_eq!(out.payload, b"payload", "{}", c.what);
                    match source {
                        Source::Client => assert_eq!(out.src, sa(c.client), "{}", c.what),
                        Source::Snat(ip) => {
                            assert_eq!(out.src.ip(), ip.parse::<IpAddr>().unwrap(), "{}", c.what);
                            assert!(in_snat_range(out.src.port()), "{}", c.what);
                        }
                    }
                }
            }
            let moved: BTreeMap<&str, u64> = before
                .iter()
                .zip(&after)
                .enumerate()
                .filter(|(_, (b, a))| a != b)
                .map(|(i, (b, a))| (st::NAMES[i], a - b))
                .collect();
            let expected: BTreeMap<&str, u64> = c
                .counters
                .iter()
                .map(|(i, n)| (st::NAMES[*i as usize], *n))
                .collect();
            assert_eq!(moved, expected, "{}: counters", c.what);
        }
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn malformed_and_unsupported_packets_pass_untouched_and_are_counted() {
    require_privileges("malformed_and_unsupported_packets_pass_untouched_and_are_counted");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0]));
        let v4 = frame(TCP, sa("203.0.113.7:40000"), sa("192.0.2.1:30080"), b"data");
        let v6 = frame(
            UDP,
            sa("[2001:db8:9::7]:4000"),
            sa("[2001:db8:1::1]:30053"),
            b"data",
        );
        let mut bad_ihl = v4.clone();
        bad_ihl[packet::L3] = 0x44;
        let mut long_v4 = v4.clone();
        long_v4[packet::L3 + 2..packet::L3 + 4].copy_from_slice(&200u16.to_be_bytes());
        let mut long_v6 = v6.clone();
        long_v6[packet::L3 + 4..packet::L3 + 6].copy_from_slice(&200u16.to_be_bytes());
        let mut not_v4 = v4.clone();
        not_v4[packet::L3] = 0x65;
        let mut short_ip_len = v4.clone();
        // The IP length ends inside the TCP header.
        short_ip_len[packet::L3 + 2..packet::L3 + 4].copy_from_slice(&30u16.to_be_bytes());
        packet::fix_ipv4_checksum(&mut short_ip_len);
        let mut arp = v4.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let mut vlan = v4.clone();
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());

        let cases: Vec<(&str, Vec<u8>, Option<u32>)> = vec![
            (
                "IPv4 fragment",
                packet::as_fragment(v4.clone()),
                Some(st::XDP_PASS_FRAGMENT),
            ),
            (
                "IPv4 options",
                packet::with_ipv4_options(v4.clone()),
                Some(st::XDP_PASS_IP_OPTIONS),
            ),
            (
                "IPv6 extension header",
                packet::with_ipv6_hop_by_hop(v6.clone()),
                Some(st::XDP_PASS_IP_OPTIONS),
            ),
            (
                "IPv6 fragment header",
                {
                    let mut f = packet::with_ipv6_hop_by_hop(v6.clone());
                    f[packet::L3 + 6] = 44;
                    f
                },
                Some(st::XDP_PASS_FRAGMENT),
            ),
            (
                "truncated TCP header",
                v4[..packet::L3 + 20 + 10].to_vec(),
                Some(st::XDP_PASS_MALFORMED),
            ),
            (
                "truncated IPv6 header",
                v6[..packet::L3 + 30].to_vec(),
                Some(st::XDP_PASS_MALFORMED),
            ),
            (
                "IPv4 header length under 20",
                bad_ihl,
                Some(st::XDP_PASS_MALFORMED),
            ),
            (
                "IPv4 total length past the frame",
                long_v4,
                Some(st::XDP_PASS_MALFORMED),
            ),
            (
                "IPv6 payload length past the frame",
                long_v6,
                Some(st::XDP_PASS_MALFORMED),
            ),
            (
                "IP length inside the TCP header",
                short_ip_len,
                Some(st::XDP_PASS_MALFORMED),
            ),
            (
                "IPv4 ethertype with version 6",
                not_v4,
                Some(st::XDP_PASS_MALFORMED),
            ),
            ("ARP", arp, None),
            ("VLAN tag", vlan, None),
            // The kernel hands XDP nothing shorter than an Ethernet header.
            (
                "Ethernet header only",
                v4[..packet::L3].to_vec(),
                Some(st::XDP_PASS_MALFORMED),
            ),
        ];
        for (what, f, counter) in cases {
            let before = lab.stats();
            assert_eq!(lab.xdp(&f), (XDP_PASS, f.clone()), "{what}");
            let after = lab.stats();
            let changed: BTreeMap<usize, u64> = (0..after.len())
                .filter(|i| after[*i] != before[*i])
                .map(|i| (i, after[i] - before[i]))
                .collect();
            let expected: BTreeMap<usize, u64> =
                counter.into_iter().map(|c| (c as usize, 1)).collect();
            assert_eq!(changed, expected, "{what}: counters changed");
            // tc egress leaves them alone too (the kernel's test run, like its stack, only
            // makes skbs of IP packets with a whole IP header).
            let ip_header = match f[12..14] {
                [0x08, 0x00] => 20,
                [0x86, 0xdd] => 40,
                _ => 0,
            };
            if f.len() >= packet::L3 + ip_header {
                let out = lab.loaded.test_run(TC_PROGRAM, &f, 0, 1);
                let out = out.unwrap_or_else(|e| panic!("{what} at tc: {e:?}"));
                assert_eq!(
                    (out.verdict, out.frame),
                    (TCX_NEXT, f.clone()),
                    "{what} at tc"
                );
            }
        }
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn established_flows_keep_their_backend_while_the_backend_set_changes() {
    require_privileges("established_flows_keep_their_backend_while_the_backend_set_changes");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0, 1, 2, 3]));
        let flow = |port: u16| {
            frame(
                TCP,
                SocketAddr::new("203.0.113.7".parse().unwrap(), port),
                sa("192.0.2.1:30080"),
                b"",
            )
        };
        // 400 flows spread over the four backends by Maglev.
        let mut first: BTreeMap<u16, Parsed> = BTreeMap::new();
        for port in 20000..20400 {
            first.insert(port, lab.translated(&flow(port), XDP_TX));
        }
        let per_backend = |m: &BTreeMap<u16, Parsed>| {
            let mut c: BTreeMap<SocketAddr, usize> = BTreeMap::new();
            for p in m.values() {
                *c.entry(p.dst).or_default() += 1;
            }
            c
        };
        let spread = per_backend(&first);
        assert_eq!(spread.len(), 4, "{spread:?}");
        assert!(spread.values().all(|n| *n >= 60), "balanced: {spread:?}");

        // A UDP flow to every backend too.
        let udp_flow = |port: u16| {
            frame(
                UDP,
                SocketAddr::new("203.0.113.8".parse().unwrap(), port),
                sa("192.0.2.1:30053"),
                b"q",
            )
        };
        let udp_first: BTreeMap<u16, Parsed> = (20000..20100)
            .map(|p| (p, lab.translated(&udp_flow(p), XDP_TX)))
            .collect();

        // Backend 192.0.2.53 goes away and 192.0.2.54 comes: every established TCP flow
        // stays where it is (same backend, same SNAT port), those of the removed backend
        // included, as kube-proxy keeps them (the pod may still be draining).
        lab.program(&manifests(&[0, 1, 2, 4]));
        let gone = sa("192.0.2.53:8080");
        for (port, before) in &first {
            let now = lab.translated(&flow(*port), XDP_TX);
            assert_eq!(now, *before, "flow from port {port} stayed");
        }
        // The sweep removes the UDP flows of the removed endpoint (so their clients move,
        // as kube-proxy clears UDP conntrack) and nothing else.
        let mut sweeper = Sweeper::open(&lab.layout, 0).expect("conntrack maps");
        // (What the agent knew is from a second later than the flows were made.)
        let owners = Owners {
            endpoints: lab.reconciler.flow_endpoints(),
            at: clock_now(1),
        };
        let report = sweeper.sweep(&owners).expect("sweep");
        let udp_gone = sa("192.0.2.53:5353");
        let udp_on_gone = udp_first.values().filter(|p| p.dst == udp_gone).count() as u64;
        assert!(udp_on_gone > 0);
        assert_eq!(report.removed, [0, 0, udp_on_gone], "{report:?}");
        for (port, before) in &udp_first {
            let now = lab.translated(&udp_flow(*port), XDP_TX);
            if before.dst == udp_gone {
                assert_ne!(now.dst, udp_gone, "UDP flow from {port} moved");
            } else {
                assert_eq!(now, *before, "UDP flow from {port} stayed");
            }
        }
        // New flows reach the new backend and never the removed one.
        let new: BTreeMap<u16, Parsed> = (30000..30400)
            .map(|p| (p, lab.translated(&flow(p), XDP_TX)))
            .collect();
        let spread = per_backend(&new);
        assert!(!spread.contains_key(&gone), "{spread:?}");
        assert!(
            spread.get(&sa("192.0.2.54:8080")).is_some_and(|n| *n >= 60),
            "{spread:?}"
        );
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn flows_move_to_the_maps_of_answered_flows_once_answered() {
    require_privileges("flows_move_to_the_maps_of_answered_flows_once_answered");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0]));
        // Which maps hold flow `client`'s entry and its reverse entry (`reply`): answered
        // ones, new ones.
        let held = |lab: &Lab, client: SocketAddr, reply: (SocketAddr, SocketAddr)| {
            let flows = |name| -> Vec<(FlowKey, CtEntry)> {
                read_lru(&lab.layout, name, 1000).expect("conntrack")
            };
            let revs = |name| -> Vec<(FlowKey, FlowRevNat)> {
                read_lru(&lab.layout, name, 1000).expect("reverse NAT")
            };
            let has_flow = |name| flows(name).iter().any(|(k, _)| ends(k).0 == client);
            let has_rev = |name| revs(name).iter().any(|(k, _)| ends(k) == reply);
            (
                (has_flow(maps::CONNTRACK), has_rev(maps::EXTERNAL_REV_NAT)),
                (has_flow(maps::CT_NEW), has_rev(maps::EXTERNAL_REV_NAT_NEW)),
            )
        };
        let (answered, new) = (
            ((true, true), (false, false)),
            ((false, false), (true, true)),
        );
        let (frontend, backend) = (sa("192.0.2.1:30080"), sa("192.0.2.50:8080"));

        // TCP: new through the handshake (a spoofed client never acknowledges), answered
        // from the client's ACK on; the flow keeps working throughout.
        let client = sa("203.0.113.7:40000");
        let snat = lab
            .translated(&tcp_frame(client, frontend, SYN, b""), XDP_TX)
            .src;
        assert_eq!(held(&lab, client, (backend, snat)), new, "after the SYN");
        lab.translated(&tcp_frame(backend, snat, SYN | ACK, b""), XDP_TX);
        assert_eq!(
            held(&lab, client, (backend, snat)),
            new,
            "after the SYN-ACK"
        );
        lab.translated(&tcp_frame(client, frontend, ACK, b"GET /"), XDP_TX);
        assert_eq!(
            held(&lab, client, (backend, snat)),
            answered,
            "after the ACK"
        );
        let back = lab.translated(&tcp_frame(backend, snat, ACK, b"200"), XDP_TX);
        assert_eq!((back.src, back.dst), (frontend, client));
        assert_eq!(lab.flow(client, 0).state, "established");

        // UDP: new until the backend answers.
        let (client, frontend, backend) = (
            sa("203.0.113.7:40001"),
            sa("192.0.2.1:30053"),
            sa("192.0.2.50:5353"),
        );
        let snat = lab
            .translated(&frame(UDP, client, frontend, b"q"), XDP_TX)
            .src;
        lab.translated(&frame(UDP, client, frontend, b"q again"), XDP_TX);
        assert_eq!(held(&lab, client, (backend, snat)), new, "one way");
        let back = lab.translated(&frame(UDP, backend, snat, b"a"), XDP_TX);
        assert_eq!((back.src, back.dst), (frontend, client));
        assert_eq!(held(&lab, client, (backend, snat)), answered, "answered");
        lab.translated(&frame(UDP, client, frontend, b"q"), XDP_TX);
        assert_eq!(lab.flow(client, 0).state, "udp_stream");

        // A client port reused towards another frontend of the same local backend makes the
        // same replies as the answered flow before it: the new flow owns them.
        let (client, pod) = (sa("203.0.113.7:40002"), sa("10.244.0.10:8443"));
        let (lb_ip, node_port) = (sa("198.51.100.10:443"), sa("192.0.2.1:30443"));
        lab.translated(&tcp_frame(client, lb_ip, SYN, b""), XDP_PASS);
        lab.tc(&tcp_frame(pod, client, SYN | ACK, b""));
        lab.translated(&tcp_frame(client, lb_ip, ACK, b""), XDP_PASS);
        assert_eq!(held(&lab, client, (pod, client)), answered);
        lab.translated(&tcp_frame(client, node_port, SYN, b""), XDP_PASS);
        let (v, out) = lab.tc(&tcp_frame(pod, client, SYN | ACK, b""));
        assert_eq!(v, TCX_NEXT);
        let out = packet::parse(&out).expect("reversed");
        assert_eq!(
            (out.src, out.dst),
            (node_port, client),
            "from the new flow's frontend"
        );

        // The sweep judges both maps alike: everything expires in time.
        let report = Sweeper::open(&lab.layout, 100_000)
            .expect("maps")
            .sweep(&Owners::default())
            .expect("sweep");
        assert_eq!(report.removed_total(), 4, "{report:?}");
        assert!(lab.flows(0).is_empty());
        for name in [maps::EXTERNAL_REV_NAT, maps::EXTERNAL_REV_NAT_NEW] {
            let left: Vec<(FlowKey, FlowRevNat)> = read_lru(&lab.layout, name, 10).expect("read");
            assert!(left.is_empty(), "{name}: {left:?}");
        }
    });
}

/// A flow key's source and destination.
fn ends(k: &FlowKey) -> (SocketAddr, SocketAddr) {
    let at = |ip, port| lb_userspace::addr::to_socket_addr(&lb_common::Endpoint::new(ip, port));
    (at(k.saddr, k.sport_be), at(k.daddr, k.dport_be))
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn flows_have_a_state_and_a_lifetime_and_expire() {
    require_privileges("flows_have_a_state_and_a_lifetime_and_expire");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0]));
        let (client, frontend, backend) = (
            sa("203.0.113.7:40000"),
            sa("192.0.2.1:30080"),
            sa("192.0.2.50:8080"),
        );

        // A TCP segment of no flow is not a new flow: dropped and counted.
        let (v, _) = lab.xdp(&tcp_frame(client, frontend, ACK, b"data"));
        assert_eq!(v, XDP_DROP, "mid-stream packet of no flow");
        assert_eq!(lab.stat(st::XDP_DROP_NO_FLOW), 1);

        // The handshake: SYN (syn), the backend's SYN-ACK through the reverse path (still
        // syn: a spoofed client never acknowledges), the client's ACK (established).
        let out = lab.translated(&tcp_frame(client, frontend, SYN, b""), XDP_TX);
        assert_eq!(out.dst, backend);
        let snat = out.src;
        let f = lab.flow(client, 0);
        assert_eq!((f.state.as_str(), f.snat), ("syn", Some(snat)));
        assert!((59..=60).contains(&f.expires_in_s), "{f:?}");
        let back = lab.translated(&tcp_frame(backend, snat, SYN | ACK, b""), XDP_TX);
        assert_eq!((back.src, back.dst), (frontend, client));
        assert_eq!(lab.flow(client, 0).state, "syn");
        lab.translated(&tcp_frame(client, frontend, ACK, b"GET /"), XDP_TX);
        let f = lab.flow(client, 0);
        assert_eq!(f.state, "established");
        assert!((86_399..=86_400).contains(&f.expires_in_s), "{f:?}");

        // A FIN one way: half closed; both ways: closed, kept 10 s for the last packets.
        lab.translated(&tcp_frame(client, frontend, FIN | ACK, b""), XDP_TX);
        assert_eq!(lab.flow(client, 0).state, "close_wait");
        lab.translated(&tcp_frame(backend, snat, FIN | ACK, b""), XDP_TX);
        let f = lab.flow(client, 0);
        assert_eq!(f.state, "closed");
        assert!((9..=10).contains(&f.expires_in_s), "{f:?}");
        lab.translated(&tcp_frame(client, frontend, ACK, b""), XDP_TX);

        // A UDP flow: 30 s without an answer.
        let udp_client = sa("203.0.113.7:40001");
        let udp = lab.translated(&frame(UDP, udp_client, sa("192.0.2.1:30053"), b"q"), XDP_TX);
        let f = lab.flow(udp_client, 0);
        assert_eq!(f.state, "udp");
        assert!((29..=30).contains(&f.expires_in_s), "{f:?}");

        // 31 s later both have expired: the programs ignore them at once. The client's
        // late ACK is a packet of no flow; the backend's reply and the UDP answer pass to
        // the stack untranslated.
        let mut later = lab.later(31);
        let ext0 = lab.ext0;
        assert_eq!(lab.flow(client, 31).state, "expired");
        let (v, _) = xdp_in(&mut later, ext0, &tcp_frame(client, frontend, ACK, b""));
        assert_eq!(v, XDP_DROP);
        let stale = lab.stat(st::STALE_REPLY);
        let (v, _) = xdp_in(&mut later, ext0, &tcp_frame(backend, snat, ACK, b""));
        assert_eq!(v, XDP_PASS, "reply of an expired flow");
        let (v, _) = xdp_in(&mut later, ext0, &frame(UDP, udp.dst, udp.src, b"a"));
        assert_eq!(v, XDP_PASS, "answer of an expired UDP flow");
        assert_eq!(lab.stat(st::STALE_REPLY), stale + 2);

        // The sweep (on the same clock) removes both with their reverse entries; a new
        // SYN from the same client port is a new flow.
        let owners = Owners::now(lab.reconciler.flow_endpoints(), 31);
        let report = Sweeper::open(&lab.layout, 31)
            .expect("maps")
            .sweep(&owners)
            .expect("sweep");
        assert_eq!(report.removed, [2, 0, 0], "{report:?}");
        assert!(lab.flows(31).is_empty());
        let out = xdp_in(&mut later, ext0, &tcp_frame(client, frontend, SYN, b"")).0;
        assert_eq!(out, XDP_TX);
        assert_eq!(lab.flow(client, 31).state, "syn");
        // Nothing else was left behind: a second sweep finds the orphan-free maps as they
        // are (the new flow is live).
        let mut sweeper = Sweeper::open(&lab.layout, 31).expect("maps");
        for _ in 0..2 {
            let r = sweeper.sweep(&owners).expect("sweep");
            assert_eq!(r.removed_total(), 0, "{r:?}");
        }
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn snat_ports_of_ended_flows_come_back_without_a_sweep() {
    require_privileges("snat_ports_of_ended_flows_come_back_without_a_sweep");
    let node = Node::new();
    node.run(|| {
        let settings = Settings {
            snat_ports: (61000, 61255),
            ..Settings::default()
        };
        let mut lab = Lab::with(&node.pins, &settings);
        lab.program(&manifests(&[0]));
        let frontend = sa("192.0.2.1:30080");
        let client = |i: u16| SocketAddr::new("203.0.113.7".parse().unwrap(), 20000 + i);

        // A client port inside the SNAT range is kept when free, as Linux's NAT does.
        let own = SocketAddr::new("203.0.113.9".parse().unwrap(), 61100);
        let out = lab.translated(&tcp_frame(own, frontend, SYN, b""), XDP_TX);
        assert_eq!(out.src.port(), 61100);

        // Open flows until the 256 ports run out: new flows are then dropped and counted.
        let mut open = Vec::new();
        for i in 0..400 {
            let (v, f) = lab.xdp(&tcp_frame(client(i), frontend, SYN, b""));
            match v {
                XDP_TX => open.push((client(i), packet::parse(&f).expect("frame").src)),
                XDP_DROP => {}
                other => panic!("verdict {other}"),
            }
        }
        assert!(
            open.len() >= 200 && open.len() <= 255,
            "{} flows",
            open.len()
        );
        assert!(lab.stat(st::XDP_DROP_NO_SNAT_PORT) > 0);
        let ports: BTreeSet<u16> = open.iter().map(|(_, s)| s.port()).collect();
        assert_eq!(ports.len(), open.len(), "one port per flow");

        // The flows end (the clients reset them): with no sweep, new flows take their ports
        // (once the grace for the ended flows' last packets has passed).
        for (c, _) in &open {
            lab.translated(&tcp_frame(*c, frontend, RST | ACK, b""), XDP_TX);
        }
        std::thread::sleep(PORT_GRACE);
        let reused = lab.stat(st::SNAT_PORT_REUSED);
        // (Ports are tried at random, 16 at most: with 100 of some 250 ports still held
        // by ended flows the odds of finding none are 1 in a million per flow.)
        for i in 1000..1100 {
            lab.translated(&tcp_frame(client(i), frontend, SYN, b""), XDP_TX);
        }
        assert!(lab.stat(st::SNAT_PORT_REUSED) > reused);
        // A taken-over flow is gone, with its reverse entry: the maps hold one of each per
        // live flow after a sweep that finds nothing expired.
        let flows = lab.flows(0);
        let live = flows.iter().filter(|f| f.state == "syn").count();
        assert_eq!(live, 101, "the client in the range and the 100 new flows");
        let snat_ports: BTreeSet<SocketAddr> = flows
            .iter()
            .filter(|f| f.state == "syn")
            .filter_map(|f| f.snat)
            .collect();
        assert_eq!(snat_ports.len(), live, "no port held twice");
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_closing_flow_keeps_its_snat_port_until_both_ends_are_done() {
    require_privileges("a_closing_flow_keeps_its_snat_port_until_both_ends_are_done");
    let node = Node::new();
    node.run(|| {
        // One SNAT port: a second flow gets it only when the first is over at both ends.
        let settings = Settings {
            snat_ports: (61000, 61000),
            ..Settings::default()
        };
        let mut lab = Lab::with(&node.pins, &settings);
        lab.program(&manifests(&[0]));
        let (frontend, backend) = (sa("192.0.2.1:30080"), sa("192.0.2.50:8080"));
        let clients = [
            sa("203.0.113.7:40000"),
            sa("203.0.113.8:40000"),
            sa("203.0.113.9:40000"),
        ];
        let open = |lab: &mut Lab, client: SocketAddr| {
            let out = lab.translated(&tcp_frame(client, frontend, SYN, b""), XDP_TX);
            assert_eq!(out.src.port(), 61000);
            lab.translated(&tcp_frame(backend, out.src, SYN | ACK, b""), XDP_TX);
            lab.translated(&tcp_frame(client, frontend, ACK, b""), XDP_TX);
            out.src
        };
        let refused = |lab: &mut Lab, client: SocketAddr| {
            let before = lab.stat(st::XDP_DROP_NO_SNAT_PORT);
            let (v, _) = lab.xdp(&tcp_frame(client, frontend, SYN, b""));
            assert_eq!(v, XDP_DROP, "{client}: the port is still held");
            assert_eq!(lab.stat(st::XDP_DROP_NO_SNAT_PORT), before + 1);
        };

        // The client closes first. Both FINs seen, the backend's not yet acknowledged: the
        // backend is in LAST_ACK on that port, so the port stays with the flow.
        let snat = open(&mut lab, clients[0]);
        lab.translated(&tcp_frame(clients[0], frontend, FIN | ACK, b""), XDP_TX);
        lab.translated(&tcp_frame(backend, snat, FIN | ACK, b""), XDP_TX);
        assert_eq!(lab.flow(clients[0], 0).state, "closed");
        refused(&mut lab, clients[1]);
        // The client's last ACK ends it: the next flow takes the port over, once that ACK
        // has had a moment to reach the backend first.
        lab.translated(&tcp_frame(clients[0], frontend, ACK, b""), XDP_TX);
        let ended = Instant::now();
        let (v, _) = lab.xdp(&tcp_frame(clients[1], frontend, SYN, b""));
        if ended.elapsed() < Duration::from_millis(u64::from(CT_PORT_GRACE_MS) / 2) {
            assert_eq!(v, XDP_DROP, "the port is taken over only after a grace");
        }
        std::thread::sleep(PORT_GRACE);
        let reused = lab.stat(st::SNAT_PORT_REUSED);
        assert_eq!(open(&mut lab, clients[1]), snat);
        assert_eq!(lab.stat(st::SNAT_PORT_REUSED), reused + 1);
        let (v, _) = lab.xdp(&tcp_frame(clients[0], frontend, ACK, b""));
        assert_eq!(v, XDP_DROP, "the taken-over flow is gone");

        // The backend closes first: the client's FIN answers it, the backend's ACK ends it.
        lab.translated(&tcp_frame(backend, snat, FIN | ACK, b""), XDP_TX);
        lab.translated(&tcp_frame(clients[1], frontend, FIN | ACK, b""), XDP_TX);
        refused(&mut lab, clients[2]);
        lab.translated(&tcp_frame(backend, snat, ACK, b""), XDP_TX);
        std::thread::sleep(PORT_GRACE);
        assert_eq!(open(&mut lab, clients[2]), snat);
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn clients_keep_their_backend_under_session_affinity_until_the_timeout() {
    require_privileges("clients_keep_their_backend_under_session_affinity_until_the_timeout");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        let mut spec = web_spec();
        spec["sessionAffinity"] = json!("ClientIP");
        spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 30}});
        lab.program(&manifests_with(spec.clone(), &[0, 1, 2]));
        for (client, frontend) in [
            ("203.0.113.7", "192.0.2.1:30080"),
            ("2001:db8:9::7", "[2001:db8:1::1]:30080"),
        ] {
            let frontend = sa(frontend);
            let from = |port: u16| SocketAddr::new(client.parse().unwrap(), port);
            // 30 connections from one client (each from another port): one backend.
            let hits = lab.stat(st::XDP_AFFINITY_HIT);
            let picked: BTreeSet<SocketAddr> = (0..30)
                .map(|i| lab.translated(&tcp_frame(from(41000 + i), frontend, SYN, b""), XDP_TX))
                .map(|out| out.dst)
                .collect();
            assert_eq!(picked.len(), 1, "{client}: {picked:?}");
            assert_eq!(lab.stat(st::XDP_AFFINITY_HIT), hits + 29);
            // Other clients spread over the backends (without affinity one would too).
            let others: BTreeSet<SocketAddr> = (1..=40u16)
                .map(|i| {
                    let other = if frontend.is_ipv4() {
                        format!("203.0.113.{}:40000", 100 + i)
                    } else {
                        format!("[2001:db8:9::{:x}]:40000", 0x100 + i)
                    };
                    lab.translated(&tcp_frame(sa(&other), frontend, SYN, b""), XDP_TX)
                        .dst
                })
                .collect();
            assert_eq!(others.len(), 3, "{others:?}");

            // 31 s after the last new flow the timeout has run out: the next flow is picked
            // anew (by the Maglev table), not by affinity.
            let mut later = lab.later(31);
            let hits = lab.stat(st::XDP_AFFINITY_HIT);
            let (v, _) = xdp_in(
                &mut later,
                lab.ext0,
                &tcp_frame(from(42000), frontend, SYN, b""),
            );
            assert_eq!(v, XDP_TX);
            assert_eq!(lab.stat(st::XDP_AFFINITY_HIT), hits, "{client}: expired");
        }

        // The remembered backend leaves the table: affinity to it is not honoured.
        let client = |port: u16| SocketAddr::new("203.0.113.8".parse().unwrap(), port);
        let frontend = sa("192.0.2.1:30080");
        let first = lab
            .translated(&tcp_frame(client(43000), frontend, SYN, b""), XDP_TX)
            .dst;
        // Backend i of `web` is 192.0.2.(50 + i).
        let rest: Vec<u8> = (0..3u8)
            .filter(|i| first.ip().to_string() != format!("192.0.2.{}", 50 + i))
            .collect();
        assert_eq!(rest.len(), 2);
        lab.program(&manifests_with(spec, &rest));
        let hits = lab.stat(st::XDP_AFFINITY_HIT);
        let next = lab
            .translated(&tcp_frame(client(43001), frontend, SYN, b""), XDP_TX)
            .dst;
        assert_ne!(next, first, "affinity to a backend that left");
        assert_eq!(lab.stat(st::XDP_AFFINITY_HIT), hits);
        // The client's new backend is remembered in turn.
        let again = lab
            .translated(&tcp_frame(client(43002), frontend, SYN, b""), XDP_TX)
            .dst;
        assert_eq!(again, next);
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_cluster_service_with_no_backend_answers_port_unreachable() {
    require_privileges("a_cluster_service_with_no_backend_answers_port_unreachable");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        // `web` (Cluster policy) without endpoints; `ext` (Local) without a local one.
        lab.program(&manifests(&[]));
        let cases = [
            (TCP, "203.0.113.7:40000", "192.0.2.1:30080"),
            (UDP, "203.0.113.7:40001", "192.0.2.1:30053"),
            (TCP, "[2001:db8:9::7]:40000", "[2001:db8:1::1]:30080"),
            (UDP, "[2001:db8:9::7]:40001", "[2001:db8:1::1]:30053"),
        ];
        for (proto, client, frontend) in cases {
            let (client, frontend) = (sa(client), sa(frontend));
            let f = frame(proto, client, frontend, b"anyone there?");
            let (v, out) = lab.xdp(&f);
            assert_eq!(v, XDP_TX, "{client} -> {frontend}");
            // A whole ICMP error (checksums verified), from the frontend to the client, back
            // to the MAC it came from, quoting the IP header and the ports.
            let icmp = packet::parse_icmp_error(&out).expect("an ICMP error");
            assert_eq!((icmp.src, icmp.dst), (frontend.ip(), client.ip()));
            let ((kind, code), ip_len) = if client.is_ipv6() {
                ((1, 4), 40)
            } else {
                ((3, 3), 20)
            };
            assert_eq!((icmp.kind, icmp.code), (kind, code));
            assert_eq!((&icmp.dmac[..], &icmp.smac[..]), (&f[6..12], &f[..6]));
            assert_eq!(icmp.quoted, f[14..14 + ip_len + 8]);
        }
        assert_eq!(lab.stat(st::XDP_REJECT_NO_BACKEND), 4);
        assert!(lab.flows(0).is_empty(), "a refusal records no flow");
        // Local policy without a local endpoint: dropped, as kube-proxy does.
        let drops = lab.stat(st::XDP_DROP_NO_BACKEND);
        let f = frame(TCP, sa("203.0.113.7:40002"), sa("198.51.100.20:8080"), b"");
        assert_eq!(lab.xdp(&f).0, XDP_DROP);
        assert_eq!(lab.stat(st::XDP_DROP_NO_BACKEND), drops + 1);
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn snat_follows_where_the_backend_runs_and_overlay_replies_are_reversed() {
    require_privileges("snat_follows_where_the_backend_runs_and_overlay_replies_are_reversed");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        // One NodePort service per case, with one backend: where it runs (the slice's
        // nodeName; none: unknown), and the device the route to it takes (pod0 runs no
        // program, like an overlay the agent was not told of; ext0 runs XDP).
        let cases = [
            ("far", "10.244.0.20", Some("node-b"), 30101),
            ("near", "192.0.2.53", Some("node-a"), 30102),
            ("anon-pod", "10.244.0.21", None, 30103),
            ("anon-ext", "192.0.2.54", None, 30104),
        ];
        let mut objects = Vec::new();
        for (i, (name, ip, node, node_port)) in cases.iter().enumerate() {
            let spec = json!({
                "type": "NodePort",
                "clusterIP": format!("10.96.1.{i}"), "clusterIPs": [format!("10.96.1.{i}")],
                "ports": ports(&[("http", 80, "TCP", 8080, *node_port)]),
            });
            objects.push(service(("shop", name), spec, json!({})));
            let ep = Ep::ready(ip);
            let ep = match node {
                Some(n) => ep.on_node(n),
                None => ep,
            };
            let ports = [("http", 8080, "TCP")];
            objects.push(slice(
                "shop",
                &format!("{name}-1"),
                name,
                "IPv4",
                &ports,
                &[ep],
            ));
        }
        lab.program(&objects);
        let mut port = 40000;
        // A new flow from a new client port to node port `node_port`: the verdict, the
        // client and the source the flow leaves with.
        let mut open = |lab: &mut Lab, node_port: u16| -> (i32, SocketAddr, SocketAddr) {
            port += 1;
            let client = sa(&format!("203.0.113.7:{port}"));
            let f = tcp_frame(client, sa(&format!("192.0.2.1:{node_port}")), SYN, b"");
            let (v, out) = lab.xdp(&f);
            (v, client, packet::parse(&out).expect("translated").src)
        };
        let unwatched = st::XDP_SNAT_UNWATCHED_DEVICE;
        // On another node: SNATed whatever the device, here to pod0's address; counted, as
        // nothing reverses replies arriving on pod0.
        let (v, _, src) = open(&mut lab, 30101);
        assert_eq!((v, src.ip().to_string().as_str()), (XDP_PASS, "10.244.0.1"));
        assert!(in_snat_range(src.port()));
        assert_eq!(lab.stat(unwatched), 1);
        // On this node: never SNATed, even out of an XDP device.
        let (v, _, src) = open(&mut lab, 30102);
        assert_eq!((v, src.ip().to_string().as_str()), (XDP_TX, "203.0.113.7"));
        // Unknown: SNATed when the route leaves by a device a program runs on.
        assert_eq!(open(&mut lab, 30103).2.ip().to_string(), "203.0.113.7");
        let (v, _, src) = open(&mut lab, 30104);
        assert_eq!((v, src.ip().to_string().as_str()), (XDP_TX, "192.0.2.1"));
        assert_eq!(lab.stat(unwatched), 1);

        // pod0 becomes an overlay device: replies arriving on it are reversed there.
        let pod0 = lb_userspace::agent::netdev::ifindex("pod0").expect("pod0");
        let device = Device {
            name: "pod0".into(),
            ifindex: pod0,
        };
        lab.loaded
            .attach_overlay(&device)
            .expect("tc ingress on a veth");
        let (_, client, snat) = open(&mut lab, 30101);
        assert_eq!(lab.stat(unwatched), 1, "pod0 is watched now");
        let (_, _, anon) = open(&mut lab, 30103);
        assert_eq!(
            anon.ip().to_string(),
            "10.244.0.1",
            "unknown, out of an overlay"
        );
        let reply = tcp_frame(sa("10.244.0.20:8080"), snat, SYN | ACK, b"");
        let (v, out) = lab.overlay(&reply, pod0);
        assert_eq!(v, TC_ACT_REDIRECT, "redirected towards the client");
        let out = packet::parse(&out).expect("a whole reversed reply");
        assert_eq!((out.src, out.dst), (sa("192.0.2.1:30101"), client));
        assert_eq!(lab.stat(st::OVERLAY_REVERSED), 1);
        // The replies keep the flow's state: the backend's FIN half closes it.
        let frontend = sa("192.0.2.1:30101");
        lab.translated(&tcp_frame(client, frontend, ACK, b""), XDP_PASS);
        assert_eq!(lab.flow(client, 0).state, "established");
        let fin = tcp_frame(sa("10.244.0.20:8080"), snat, FIN | ACK, b"");
        assert_eq!(lab.overlay(&fin, pod0).0, TC_ACT_REDIRECT);
        assert_eq!(lab.flow(client, 0).state, "close_wait");
        assert_eq!(lab.stat(st::OVERLAY_REVERSED), 2);
        // An ICMP error about a packet sent to it over the overlay (from the backend itself)
        // goes to the client from the frontend, quoting the client's own packet.
        let backend = sa("10.244.0.20:8080");
        let sent = tcp_frame(snat, backend, ACK, b"data");
        let err = packet::icmp_error((backend.ip(), snat.ip()), (3, 3), [0; 4], &sent[14..]);
        let (v, out) = lab.overlay(&err, pod0);
        assert_eq!(v, TC_ACT_REDIRECT);
        let e = packet::parse_icmp_error(&out).expect("a whole ICMP error");
        assert_eq!((e.src, e.dst), (frontend.ip(), client.ip()));
        let quoted = packet::parse(&[&out[..14], &e.quoted[..]].concat()).expect("quoted");
        assert_eq!((quoted.src, quoted.dst), (client, frontend));
        assert_eq!(lab.stat(st::TC_ICMP_TRANSLATED), 1);
        // Anything else goes on untouched: a packet to a port out of the SNAT range, and one
        // to an SNAT port from an address and port its flow does not send to.
        for f in [
            tcp_frame(sa("10.244.0.20:8080"), sa("10.244.0.1:40000"), ACK, b""),
            tcp_frame(sa("10.244.0.20:9999"), snat, ACK, b""),
        ] {
            assert_eq!(lab.overlay(&f, pod0), (TCX_NEXT, f.clone()));
        }
        assert_eq!(lab.stat(st::OVERLAY_REVERSED), 2);
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn icmp_errors_about_translated_flows_reach_the_other_side() {
    require_privileges("icmp_errors_about_translated_flows_reach_the_other_side");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0]));
        let cases = [
            (
                ("203.0.113.7:40000", "192.0.2.1:30080", "192.0.2.50:8080"),
                "198.18.0.1",
                (3, 4), // fragmentation needed
                [0, 0, 0x05, 0xdc],
            ),
            (
                (
                    "[2001:db8:9::7]:40000",
                    "[2001:db8:1::1]:30080",
                    "[2001:db8:1::50]:8080",
                ),
                "2001:db8:ffff::1",
                (2, 0), // packet too big
                [0, 0, 0x05, 0x00],
            ),
        ];
        // An error as it leaves: from the router, its type, code and MTU kept, quoting a
        // packet (checksums verified from scratch) that now reads `inner`.
        let check = |out: &[u8], router: IpAddr, to: IpAddr, kind, rest, inner| {
            let e = packet::parse_icmp_error(out).expect("an ICMP error");
            assert_eq!(
                (e.src, e.dst, (e.kind, e.code), e.rest),
                (router, to, kind, rest)
            );
            let quoted = [&out[..14], &e.quoted[..]].concat();
            let q = packet::parse(&quoted).expect("the quoted packet, whole");
            assert_eq!((q.src, q.dst), inner);
        };
        for ((client, frontend, backend), router, kind, rest) in cases {
            let (client, frontend, backend) = (sa(client), sa(frontend), sa(backend));
            let router: IpAddr = router.parse().unwrap();
            let (v, sent) = lab.xdp(&tcp_frame(client, frontend, SYN, b""));
            assert_eq!(v, XDP_TX);
            let snat = packet::parse(&sent).expect("translated").src;
            assert_ne!(snat, client, "SNATed to node B's backend");

            // The path to the backend is too narrow for what node A sent: the client hears.
            let err = packet::icmp_error((router, snat.ip()), kind, rest, &sent[14..]);
            let (v, out) = lab.xdp(&err);
            assert_eq!(v, XDP_TX, "{client}");
            check(&out, router, client.ip(), kind, rest, (client, frontend));

            // The path to the client is too narrow for the backend's reply (as node A
            // sent it on, from the frontend): the backend hears, about its own packet.
            let (v, reply) = lab.xdp(&tcp_frame(backend, snat, SYN | ACK, b""));
            assert_eq!(v, XDP_TX);
            let err = packet::icmp_error((router, frontend.ip()), kind, rest, &reply[14..]);
            let (v, out) = lab.xdp(&err);
            assert_eq!(v, XDP_TX, "{client}");
            check(&out, router, backend.ip(), kind, rest, (backend, snat));

            // The backend itself refuses (port unreachable): the client hears it from the
            // frontend, as from any NAT.
            let unreachable = if client.is_ipv6() { (1, 4) } else { (3, 3) };
            let err =
                packet::icmp_error((backend.ip(), snat.ip()), unreachable, [0; 4], &sent[14..]);
            let (v, out) = lab.xdp(&err);
            assert_eq!(v, XDP_TX, "{client}");
            check(
                &out,
                frontend.ip(),
                client.ip(),
                unreachable,
                [0; 4],
                (client, frontend),
            );
        }
        assert_eq!(lab.stat(st::XDP_ICMP_TRANSLATED), 6);

        // A pod of this node (`lb`, Local policy: the client's address kept) refuses a
        // packet: at tc egress its error goes on to the client from the frontend, quoting
        // the client's own packet.
        let (client, frontend) = (sa("203.0.113.7:40100"), sa("198.51.100.10:443"));
        let (v, sent) = lab.xdp(&tcp_frame(client, frontend, SYN, b""));
        assert_eq!(v, XDP_PASS, "to the pod through the stack");
        let pod = packet::parse(&sent).expect("translated").dst;
        assert_eq!(
            (pod.to_string().as_str(), packet::parse(&sent).unwrap().src),
            ("10.244.0.10:8443", client)
        );
        for (sender, to) in [
            (pod.ip(), frontend.ip()),
            ("10.244.0.1".parse().unwrap(), "10.244.0.1".parse().unwrap()),
        ] {
            let err = packet::icmp_error((sender, client.ip()), (3, 3), [0; 4], &sent[14..]);
            let (v, out) = lab.tc(&err);
            assert_eq!(v, TCX_NEXT);
            check(&out, to, client.ip(), (3, 3), [0; 4], (client, frontend));
        }
        assert_eq!(lab.stat(st::TC_ICMP_TRANSLATED), 2);
        // Not about a flow: untouched.
        let err = packet::icmp_error(
            (pod.ip(), client.ip()),
            (3, 3),
            [0; 4],
            &tcp_frame(sa("203.0.113.7:1"), pod, SYN, b"")[14..],
        );
        assert_eq!(lab.tc(&err), (TCX_NEXT, err.clone()));
        assert_eq!(lab.stat(st::TC_ICMP_TRANSLATED), 2);
        // An error about a packet of no flow passes untouched.
        let stranger = tcp_frame(sa("192.0.2.1:30080"), sa("203.0.113.99:40000"), ACK, b"");
        let err = packet::icmp_error(
            ("198.18.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap()),
            (3, 4),
            [0, 0, 0x05, 0xdc],
            &stranger[14..],
        );
        assert_eq!(lab.xdp(&err), (XDP_PASS, err.clone()));
        assert_eq!(lab.stat(st::XDP_ICMP_TRANSLATED), 6);
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn packets_too_big_for_the_translated_route_get_an_icmp_with_its_mtu() {
    require_privileges("packets_too_big_for_the_translated_route_get_an_icmp_with_its_mtu");
    let node = Node::new();
    // The route to the backends (and to the clients) takes 1280 bytes at most.
    node.ns
        .ip(&["link", "set", "ext0", "mtu", "1280"])
        .expect("ip link set mtu");
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0]));
        let big = vec![7u8; 1400];
        for (client, frontend, kind) in [
            ("203.0.113.7:40000", "192.0.2.1:30053", (3, 4)),
            ("[2001:db8:9::7]:40000", "[2001:db8:1::1]:30053", (2, 0)),
        ] {
            let (client, frontend) = (sa(client), sa(frontend));
            // "Don't fragment" (IPv4 as built) or IPv6: the client hears, about its own
            // datagram, with the route's MTU, and no flow starts.
            let f = frame(UDP, client, frontend, &big);
            let (v, out) = lab.xdp(&f);
            assert_eq!(v, XDP_TX, "{client}");
            let e = packet::parse_icmp_error(&out).expect("an ICMP error");
            assert_eq!(
                (e.src, e.dst, (e.kind, e.code)),
                (frontend.ip(), client.ip(), kind)
            );
            assert_eq!(u32::from_be_bytes(e.rest), 1280);
            let ip_len = if client.is_ipv6() { 40 } else { 20 };
            assert_eq!(e.quoted, f[14..14 + ip_len + 8]);
            assert!(
                lab.flows(0).is_empty(),
                "{client}: no flow for a refused datagram"
            );
        }
        assert_eq!(lab.stat(st::XDP_TOO_BIG), 2);

        // Without "don't fragment" the datagram is translated and left to the stack, which
        // fragments it on the way.
        let (client, frontend) = (sa("203.0.113.7:40001"), sa("192.0.2.1:30053"));
        let mut f = frame(UDP, client, frontend, &big);
        f[14 + 6] = 0;
        packet::fix_ipv4_checksum(&mut f);
        let (v, out) = lab.xdp(&f);
        assert_eq!(v, XDP_PASS);
        assert_eq!(
            packet::parse(&out).expect("translated").dst,
            sa("192.0.2.50:5353")
        );

        // A reply too big for the route back to the client: the backend hears, about its
        // own reply.
        let snat = {
            let small = frame(UDP, sa("203.0.113.7:40002"), frontend, b"q");
            let (v, out) = lab.xdp(&small);
            assert_eq!(v, XDP_TX);
            packet::parse(&out).expect("translated").src
        };
        let backend = sa("192.0.2.50:5353");
        let reply = frame(UDP, backend, snat, &big);
        let (v, out) = lab.xdp(&reply);
        assert_eq!(v, XDP_TX);
        let e = packet::parse_icmp_error(&out).expect("an ICMP error");
        assert_eq!(
            (e.src, e.dst, (e.kind, e.code)),
            (snat.ip(), backend.ip(), (3, 4))
        );
        assert_eq!(e.quoted, reply[14..14 + 28]);
        assert_eq!(lab.stat(st::XDP_TOO_BIG), 3);
    });
}

const XDP_REDIRECT: i32 = 4;
const TC_ACT_OK: i32 = 0;
/// Longer than the grace before an ended flow's SNAT port serves another, on a clock that
/// ticks every few milliseconds.
const PORT_GRACE: Duration = Duration::from_millis(CT_PORT_GRACE_MS as u64 * 3);

/// The packet fuzzer's run: `LB_FUZZ_ITERATIONS` frames (2000 by default; `cargo xtask
/// fuzz` runs more) from `LB_FUZZ_SEED` (random by default, printed so a failure can be
/// replayed).
fn fuzz_settings() -> (u64, u64) {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let iterations = env("LB_FUZZ_ITERATIONS").unwrap_or(2000);
    let seed = env("LB_FUZZ_SEED").unwrap_or_else(|| fastrand::u64(..));
    (iterations, seed)
}

/// What the datapath serves, from the maps the pipeline wrote: north-south frontends
/// (address, port, protocol) and backends.
struct Served {
    frontends: BTreeSet<(IpAddr, u16, u8)>,
    backends: BTreeSet<SocketAddr>,
    node_ips: [IpAddr; 2],
}

impl Served {
    fn of(lab: &Lab) -> Self {
        let c = lab.reconciler.contents();
        Self {
            frontends: c
                .external
                .keys()
                .map(|k| {
                    (
                        lb_userspace::addr::to_ip(k.addr),
                        u16::from_be(k.port_be),
                        k.proto,
                    )
                })
                .collect(),
            backends: c
                .backends
                .values()
                .map(lb_userspace::addr::to_socket_addr)
                .collect(),
            node_ips: [
                "192.0.2.1".parse().unwrap(),
                "2001:db8:1::1".parse().unwrap(),
            ],
        }
    }

    /// The plain TCP or UDP packet's source and destination, if `f` is one.
    fn ends(f: &[u8]) -> Option<(SocketAddr, SocketAddr, u8)> {
        let l = packet::layout(f)?;
        let port = |o: usize| u16::from_be_bytes([f[l.l4 + o], f[l.l4 + o + 1]]);
        Some((
            SocketAddr::new(l.src, port(0)),
            SocketAddr::new(l.dst, port(2)),
            l.proto,
        ))
    }

    /// Whether XDP may rewrite `f`: a packet to a frontend, or a reply to a SNAT port.
    fn xdp_may_translate(&self, f: &[u8]) -> bool {
        Self::ends(f).is_some_and(|(_, dst, proto)| {
            self.to_frontend(dst, proto)
                || (self.node_ips.contains(&dst.ip()) && in_snat_range(dst.port()))
        })
    }

    fn to_frontend(&self, dst: SocketAddr, proto: u8) -> bool {
        self.frontends.contains(&(dst.ip(), dst.port(), proto))
    }

    /// Whether tc may rewrite `f`: a reply from a backend.
    fn tc_may_translate(&self, f: &[u8]) -> bool {
        Self::ends(f).is_some_and(|(src, _, _)| self.backends.contains(&src))
    }

    /// Frames to start mutating from: packets to every frontend from inside and outside the
    /// source ranges, replies to SNAT ports, packets to the node and elsewhere, fragments,
    /// options and extension headers.
    fn seeds(&self, rng: &mut fastrand::Rng) -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        for (ip, port, proto) in &self.frontends {
            let dst = SocketAddr::new(*ip, *port);
            let clients: Vec<IpAddr> = if ip.is_ipv4() {
                vec![
                    format!("203.0.113.{}", rng.u8(1..250)).parse().unwrap(),
                    "192.0.2.99".parse().unwrap(),
                ]
            } else {
                vec![format!("2001:db8:9::{:x}", rng.u16(1..)).parse().unwrap()]
            };
            for client in clients {
                let src = SocketAddr::new(client, rng.u16(1024..));
                let f = frame(*proto, src, dst, b"fuzz");
                if ip.is_ipv4() {
                    seeds.push(packet::as_fragment(f.clone()));
                    seeds.push(packet::with_ipv4_options(f.clone()));
                } else {
                    seeds.push(packet::with_ipv6_hop_by_hop(f.clone()));
                }
                seeds.push(f);
            }
        }
        for backend in &self.backends {
            let node = self.node_ips[usize::from(backend.is_ipv6())];
            for proto in [TCP, UDP] {
                let snat = SocketAddr::new(node, rng.u16(61000..));
                seeds.push(frame(proto, *backend, snat, b"reply"));
                let client = if backend.is_ipv4() {
                    sa("203.0.113.7:40000")
                } else {
                    sa("[2001:db8:9::7]:40000")
                };
                seeds.push(frame(proto, *backend, client, b"reply"));
            }
        }
        for (src, dst) in [
            ("203.0.113.7:40000", "192.0.2.1:22"),
            ("203.0.113.7:40000", "192.0.2.77:30080"),
            ("192.0.2.50:8080", "203.0.113.9:5000"),
            ("[2001:db8:9::7]:40000", "[2001:db8:1::1]:22"),
        ] {
            seeds.push(frame(TCP, sa(src), sa(dst), b"other"));
            seeds.push(frame(UDP, sa(src), sa(dst), b"other"));
        }
        seeds
    }
}

/// Changes `f` at random: bits, bytes, header fields (ethertype, IP version and header
/// length, lengths, fragment bits, protocol, ports, TCP flags), truncation, trailing bytes;
/// then, half the time, makes its checksums valid again so that the translation of
/// consistent packets is exercised too.
fn mutate(f: &mut Vec<u8>, rng: &mut fastrand::Rng) {
    const MIN_FRAME: usize = 14; // BPF_PROG_TEST_RUN takes at least an Ethernet header
    const FIELDS: [usize; 9] = [12, 13, L3, L3 + 2, L3 + 3, L3 + 4, L3 + 6, L3 + 9, L3 + 5];
    for _ in 0..rng.usize(0..=3) {
        let n = f.len();
        match rng.u8(0..8) {
            0 => f[rng.usize(..n)] ^= 1 << rng.u8(0..8),
            1 => f[rng.usize(..n)] = rng.u8(..),
            2 => f.truncate(rng.usize(MIN_FRAME..=n)),
            3 => f.extend((0..rng.usize(1..64)).map(|_| rng.u8(..))),
            4 => {
                let at = FIELDS[rng.usize(..FIELDS.len())];
                if at < n {
                    f[at] = rng.u8(..);
                }
            }
            5 => {
                // A port (source or destination) of a plain packet.
                if let Some(l) = packet::layout(f) {
                    let at = l.l4 + 2 * rng.usize(0..2);
                    f[at..at + 2].copy_from_slice(&rng.u16(..).to_be_bytes());
                }
            }
            6 => {
                if let Some(l) = packet::layout(f).filter(|l| l.proto == TCP) {
                    f[l.l4 + 13] = rng.u8(..);
                }
            }
            _ => {
                // A fresh random frame of IPv4 or IPv6.
                let len = rng.usize(MIN_FRAME..200);
                *f = (0..len).map(|_| rng.u8(..)).collect();
                let ethertype: u16 = if rng.bool() { 0x0800 } else { 0x86dd };
                f[12..14].copy_from_slice(&ethertype.to_be_bytes());
            }
        }
    }
    if rng.bool() {
        packet::fix_checksums(f);
    }
}

/// Whether an IPv4 or IPv6 frame holds its whole fixed IP header.
fn whole_ip_header(f: &[u8]) -> bool {
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => f.len() >= L3 + 20,
        0x86dd => f.len() >= L3 + 40,
        _ => true,
    }
}

/// Whether `f` is an IPv4 UDP packet without a checksum (zero): it must stay without one.
fn udp4_without_checksum(f: &[u8]) -> Option<usize> {
    let l = packet::layout(f)?;
    let at = l.l4 + 6;
    (l.src.is_ipv4() && l.proto == UDP && f[at..at + 2] == [0, 0]).then_some(at)
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn fuzzed_frames_are_translated_only_for_services_and_keep_valid_checksums() {
    require_privileges("fuzzed_frames_are_translated_only_for_services_and_keep_valid_checksums");
    let (iterations, seed) = fuzz_settings();
    eprintln!("packet fuzzer: {iterations} frames, LB_FUZZ_SEED={seed}");
    let node = Node::new();
    node.run(|| {
        let mut lab = Lab::new(&node.pins);
        lab.program(&manifests(&[0, 1]));
        let served = Served::of(&lab);
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut seeds = served.seeds(&mut rng);
        // The replies of flows the seeds open: XDP reverses those of SNATed flows, tc those
        // of local backends.
        let replies: Vec<Vec<u8>> = seeds
            .iter()
            .filter_map(|f| {
                let (v, out) = lab.xdp(f);
                let p = packet::parse(&out)
                    .ok()
                    .filter(|_| v != XDP_DROP && out != *f)?;
                Some(frame(p.proto, p.dst, p.src, b"reply"))
            })
            .collect();
        assert!(!replies.is_empty(), "the seeds open flows");
        seeds.extend(replies);
        let mut verdicts: BTreeMap<&str, u64> = BTreeMap::new();
        for i in 0..iterations {
            let mut f = seeds[rng.usize(..seeds.len())].clone();
            mutate(&mut f, &mut rng);
            let context = || format!("LB_FUZZ_SEED={seed}, frame {i}: {f:02x?}");
            let valid = packet::parse(&f).is_ok();

            // XDP.
            let (v, out) = lab.xdp(&f);
            assert!(
                [XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT].contains(&v),
                "verdict {v}; {}",
                context()
            );
            assert_eq!(out.len(), f.len(), "XDP changed the length; {}", context());
            let may = served.xdp_may_translate(&f);
            if v == XDP_DROP {
                let to_frontend =
                    Served::ends(&f).is_some_and(|(_, dst, proto)| served.to_frontend(dst, proto));
                assert!(to_frontend, "dropped traffic of no service; {}", context());
            }
            if out != f {
                assert!(
                    may,
                    "translated a frame of no service: {out:02x?}; {}",
                    context()
                );
                if valid {
                    let parsed = packet::parse(&out);
                    assert!(parsed.is_ok(), "{parsed:?} after XDP; {}", context());
                }
                if let Some(at) = udp4_without_checksum(&f) {
                    assert_eq!(out[at..at + 2], [0, 0], "UDP checksum added; {}", context());
                }
            }
            if !may {
                assert_eq!(v, XDP_PASS, "{}", context());
            }
            *verdicts
                .entry(match (v, out != f) {
                    (XDP_DROP, _) => "xdp drop",
                    (_, true) => "xdp translated",
                    _ => "xdp untouched",
                })
                .or_default() += 1;

            // tc egress. The kernel's test run builds an skb only around a whole IP header
            // (as the stack's egress skbs always have one).
            if !whole_ip_header(&f) {
                continue;
            }
            let (v, out) = lab.tc(&f);
            assert!(
                [TCX_NEXT, TC_ACT_OK].contains(&v),
                "tc verdict {v}; {}",
                context()
            );
            assert_eq!(out.len(), f.len(), "tc changed the length; {}", context());
            if out != f {
                assert!(
                    served.tc_may_translate(&f),
                    "tc rewrote a frame of no backend: {out:02x?}; {}",
                    context()
                );
                if valid {
                    let parsed = packet::parse(&out);
                    assert!(parsed.is_ok(), "{parsed:?} after tc; {}", context());
                }
                *verdicts.entry("tc translated").or_default() += 1;
            }
        }
        eprintln!("packet fuzzer: {verdicts:?}");
        // The run reached every outcome: the invariants were checked on each.
        if iterations >= 1000 {
            for outcome in ["xdp drop", "xdp translated", "xdp untouched"] {
                assert!(
                    verdicts.get(outcome).is_some_and(|n| *n > 0),
                    "{outcome}: {verdicts:?}"
                );
            }
        }
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn kernel_debug_events_cost_nothing_when_off() {
    require_privileges("kernel_debug_events_cost_nothing_when_off");
    // The verifier removes the event code when the switch is off: the programs it leaves
    // are smaller than with the switch on.
    let size = |debug: bool| {
        let tag = new_tag();
        let pins = pin_dir_of(&tag);
        let layout = PinLayout::new(&pins);
        let sizes = MapSizes {
            services: 16,
            slots: 64,
            backends: 16,
            rev_nat: 64,
            affinity: 64,
            external: 16,
            external_ids: 4,
            table_entries: 4 * 251,
            flows: 64,
            new_flows: 64,
            source_ranges: 16,
        };
        let settings = Settings {
            debug,
            ..Settings::default()
        };
        let loaded = Loaded::load_with(&layout, &sizes, &settings).expect("loads");
        let got = ["connect4", XDP_PROGRAM].map(|p| loaded.translated_size(p).expect("size"));
        drop(loaded);
        fs::remove_dir_all(&pins).expect("cleanup");
        got
    };
    let (off, on) = (size(false), size(true));
    for i in 0..2 {
        assert!(off[i] < on[i], "off {off:?} on {on:?}");
    }
}
