//! Benchmark 5, north-south forwarding: UDP packets to a node port of node A, forwarded to a
//! pod on node B (Cluster policy: DNAT and SNAT), by our XDP program and by kube-proxy's
//! iptables and nftables rules, in the two-node sandbox. Benchmark 5b: new TCP connections
//! through the same path, sustained (see [`new_connections`]).
//!
//! The traffic is made in the kernel (see `lb_tests::xdpgen`): the client's veth transmits
//! one UDP flow as fast as node A takes it, so the measured rate is what node A forwards.
//! Node B drops every packet at tc ingress and counts it. With generic receive offload on,
//! node A's veth takes frames through NAPI, as a NIC's driver does, for every variant. The
//! CPU figure is the whole machine's busy time during a run (all CPUs: generator, node A,
//! node B's sink) per forwarded packet, and the share of it spent in softirq.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddrV4},
    process::{Child, Stdio},
    time::Duration,
};

use lb_tests::{
    bench::Report,
    cluster::{CLIENT, Cluster, NODE_A, POD_B},
    kubeproxy,
    manifest::{Ep, slice},
    netns::Netns,
    process::command_in,
    run,
};
use serde_json::{Value, json};

use crate::{Plan, cluster::Baseline, progress};

const BENCH: &str = "5-north-south";
const BENCH_CONNECTIONS: &str = "5b-new-connections";
/// Clients connecting at once in 5b.
const CLIENTS: usize = 4;
const PORT: u16 = 8080;
const NODE_PORT: u16 = 30080;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);

/// Runs `args` in `ns`.
fn in_ns(ns: &Netns, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", ns.name()];
    all.extend_from_slice(args);
    run("ip", &all).unwrap_or_else(|e| panic!("{args:?} in {}: {e}", ns.name()))
}

/// Packets received by `dev` in `ns` so far.
fn rx_packets(ns: &Netns, dev: &str) -> f64 {
    let v: Value = serde_json::from_str(&in_ns(ns, &["ip", "-j", "-s", "link", "show", dev]))
        .expect("ip -j output");
    v[0]["stats64"]["rx"]["packets"]
        .as_f64()
        .expect("rx packets")
}

/// The machine's CPU time so far, in ns: (busy, softirq).
fn cpu_ns() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let fields: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .expect("the cpu line")
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ns = |jiffies: f64| jiffies * 1e9 / hz;
    // user nice system idle iowait irq softirq steal ...
    let total: f64 = fields.iter().take(8).sum();
    (ns(total - fields[3] - fields[4]), ns(fields[6]))
}

/// One run's figures.
struct Run {
    mpps: f64,
    cpu_ns_per_packet: f64,
    softirq_share: f64,
}

/// The sink in node B: drops at tc ingress of `eth0` while it runs.
struct Sink(Child);

impl Sink {
    fn start(node_b: &Netns) -> Self {
        let mut cmd = command_in(&lb_tests::bin_dir().join("lb-probe"), node_b, None)
            .expect("node B namespace");
        cmd.args(["tc-sink", "--dev", "eth0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning lb-probe tc-sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("lb-probe tc-sink");
        assert_eq!(line.trim(), "ready", "the sink did not attach");
        Self(child)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// Where the generator runs and what it sends: its namespace and device, the MAC address of
/// the device's peer, and the packet's addresses.
struct Flow<'a> {
    ns: fn(&Cluster) -> &Netns,
    dev: &'a str,
    /// The device's and its peer's.
    macs: (String, &'a str),
    src: String,
    dst: String,
}

/// The MAC address of `dev` in `ns`.
fn mac_of(ns: &Netns, dev: &str) -> String {
    in_ns(ns, &["cat", &format!("/sys/class/net/{dev}/address")])
        .trim()
        .to_owned()
}

/// The client's flow from `src_port` to the node port; `macs`: the client's and node A's
/// external device's.
fn client_flow<'a>((client, node): (&str, &'a str), src_port: u16) -> Flow<'a> {
    Flow {
        ns: Cluster::client_ns,
        dev: "eth0",
        macs: (client.to_owned(), node),
        src: format!("{CLIENT}:{src_port}"),
        dst: format!("{NODE_A}:{NODE_PORT}"),
    }
}

/// Sends `count` packets of `flow`; what node B received.
fn flood(c: &Cluster, flow: &Flow<'_>, count: u32) -> Run {
    let (rx0, (busy0, soft0)) = (rx_packets(c.node_b_ns(), "eth0"), cpu_ns());
    let out = command_in(&lb_tests::bin_dir().join("lb-probe"), (flow.ns)(c), None)
        .expect("the generator's namespace")
        .args([
            "xdp-flood",
            "--dev",
            flow.dev,
            "--src-mac",
            &flow.macs.0,
            "--dst-mac",
            flow.macs.1,
            "--src",
            &flow.src,
            "--dst",
            &flow.dst,
            "--count",
            &count.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("lb-probe xdp-flood");
    assert!(out.status.success(), "lb-probe xdp-flood failed");
    let v: Value = serde_json::from_slice(&out.stdout).expect("lb-probe JSON");
    let seconds = v["seconds"].as_f64().expect("seconds");
    let (rx1, (busy1, soft1)) = (rx_packets(c.node_b_ns(), "eth0"), cpu_ns());
    let forwarded = (rx1 - rx0).max(1.0);
    Run {
        mpps: forwarded / seconds / 1e6,
        cpu_ns_per_packet: (busy1 - busy0) / forwarded,
        softirq_share: (soft1 - soft0) / (busy1 - busy0).max(1.0),
    }
}

/// Sends a few packets of `flow` and checks they reach node B (translated: untranslated
/// ones stay in node A).
fn warm_up(c: &Cluster, flow: &Flow<'_>, variant: &str) {
    let warm = flood(c, flow, 20_000);
    assert!(
        warm.cpu_ns_per_packet < 1e6,
        "{variant}: nothing reached node B through the node port; the client's veth: {}; \
         node A's: {}",
        in_ns(c.client_ns(), &["ethtool", "-S", "eth0"]),
        in_ns(c.node_a_ns(), &["ethtool", "-S", "n-ext"]),
    );
}

/// Records the runs of one variant; its median CPU per packet.
fn record(report: &mut Report, variant: &str, runs: &[Run]) -> f64 {
    let mut metric = |name: &str, unit: &str, f: fn(&Run) -> f64| {
        report.add(BENCH, 1, variant, name, unit, runs.iter().map(f).collect())
    };
    let mpps = metric("forwarded", "Mpps", |r| r.mpps);
    let cpu = metric("CPU per forwarded packet", "ns", |r| r.cpu_ns_per_packet);
    metric("softirq share of that CPU", "%", |r| {
        r.softirq_share * 100.0
    });
    progress(&format!("   {variant}: {mpps:.2} Mpps forwarded"));
    cpu
}

/// Starts the agent and waits until it attached XDP to both devices and synced.
fn start_agent(c: &mut Cluster) {
    let log = c.agent_log();
    let (attached, synced) = (
        log.matches("north-south programs attached").count(),
        log.matches("initial sync done").count(),
    );
    c.start_agent(&["--xdp-mode", "native"]);
    c.wait_until(
        "the agent attached XDP and synced",
        Duration::from_secs(30),
        || {
            let log = c.agent_log();
            log.matches("initial sync done").count() > synced
                && log.matches("north-south programs attached").count() >= attached + 2
        },
    );
}

/// Loads a kube-proxy baseline's rules in node A.
fn load_rules(c: &Cluster, b: &Baseline) {
    let rules = std::env::temp_dir().join(format!("{}-north-south.rules", c.tag()));
    std::fs::write(&rules, &b.rules).expect("writing rules");
    let path = rules.to_string_lossy().into_owned();
    let mut load = vec!["netns", "exec", c.node_a_ns().name()];
    load.extend_from_slice(b.loader);
    load.push(&path);
    let loaded = run("ip", &load);
    let _ = std::fs::remove_file(&rules);
    loaded.unwrap_or_else(|e| panic!("loading the {} rules: {e}", b.variant));
}

/// Runs `measure` under `variant`: ours (the agent started, then killed and its datapath
/// removed) or a kube-proxy baseline (its rules loaded in node A, then deleted).
fn under<T>(
    c: &mut Cluster,
    variant: &str,
    baselines: &[Baseline],
    measure: impl FnOnce(&Cluster) -> T,
) -> T {
    if variant == "ours" {
        start_agent(c);
        let out = measure(c);
        c.kill_agent();
        assert!(c.cleanup(), "lb-agent --cleanup failed");
        return out;
    }
    let b = baselines
        .iter()
        .find(|b| b.variant == variant)
        .expect("a baseline");
    load_rules(c, b);
    let out = measure(c);
    for cmd in b.teardown {
        in_ns(c.node_a_ns(), cmd);
    }
    out
}

/// The measured service: a NodePort over pod-b1 on node B, of `protocol` (`udp`, `tcp`).
fn kube_proxy_service(protocol: &'static str) -> kubeproxy::Service {
    kubeproxy::Service {
        name: format!("bench/north-south:{protocol}"),
        frontend: SocketAddrV4::new(CLUSTER_IP, 80),
        protocol,
        endpoints: vec![SocketAddrV4::new(
            POD_B[0].parse().expect("an address"),
            PORT,
        )],
        node_port: Some(NODE_PORT),
    }
}

/// The service as a manifest, of `protocol` (`udp`, `tcp`).
fn manifest(protocol: &str) -> String {
    let upper = protocol.to_ascii_uppercase();
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "bench", "name": "north-south"},
        "spec": {
            "type": "NodePort",
            "clusterIP": CLUSTER_IP.to_string(), "clusterIPs": [CLUSTER_IP.to_string()],
            "ports": [{"name": protocol, "port": 80, "protocol": upper, "targetPort": PORT,
                       "nodePort": NODE_PORT}],
        },
    });
    format!(
        "{}\n---\n{}",
        serde_json::to_string_pretty(&service).expect("serializes"),
        slice(
            "bench",
            "north-south-1",
            "north-south",
            "IPv4",
            &[(protocol, PORT.into(), upper.as_str())],
            &[Ep::ready(POD_B[0]).on_node("node-b")],
        )
    )
}

/// Benchmark 5.
pub fn north_south(report: &mut Report, plan: &Plan) {
    progress("5: north-south forwarding through a node port");
    let mut c = Cluster::new(PORT);
    in_ns(c.node_a_ns(), &["ethtool", "-K", "n-ext", "gro", "on"]);
    in_ns(c.node_b_ns(), &["ethtool", "-K", "eth0", "gro", "on"]);
    let _sink = Sink::start(c.node_b_ns());
    // The sink drops ARP too: node A knows node B's address for good instead.
    let node_b_mac = mac_of(c.node_b_ns(), "eth0");
    in_ns(
        c.node_a_ns(),
        &[
            "ip",
            "neigh",
            "replace",
            "10.0.0.2",
            "lladdr",
            &node_b_mac,
            "dev",
            "n-peer",
            "nud",
            "permanent",
        ],
    );
    let (client_mac, mac) = (
        mac_of(c.client_ns(), "eth0"),
        mac_of(c.node_a_ns(), "n-ext"),
    );

    c.write_manifest("north-south.json", &manifest("udp"));
    let baselines = Baseline::both(&[kube_proxy_service("udp")]);
    let node_a_peer = mac_of(c.node_a_ns(), "n-peer");
    // FLOOR: the same packets made in node A and sent straight to node B's sink, with no
    // forwarding: what the generator and the sink cost on this shared CPU.
    let floor = Flow {
        ns: Cluster::node_a_ns,
        dev: "n-peer",
        macs: (node_a_peer, &node_b_mac),
        src: format!("{}:40000", lb_tests::cluster::NODE_A_PEER),
        dst: format!("{}:{PORT}", POD_B[0]),
    };
    warm_up(&c, &floor, "FLOOR");
    // Every repetition runs each variant in turn (the order alternating), each on a flow of
    // its own: an earlier variant's conntrack entry would skip the new rules.
    let variants = ["ours", "IPT", "NFT", "FLOOR"];
    let mut runs: Vec<Vec<Run>> = variants.iter().map(|_| Vec::new()).collect();
    let mut src_port = 40_000;
    for r in 0..plan.reps {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for k in order {
            src_port += 1;
            let flow = client_flow((&client_mac, &mac), src_port);
            let run = match variants[k] {
                "FLOOR" => flood(&c, &floor, plan.flood_packets),
                variant => under(&mut c, variant, &baselines, |c| {
                    warm_up(c, &flow, variant);
                    flood(c, &flow, plan.flood_packets)
                }),
            };
            runs[k].push(run);
        }
    }
    drop(c);
    let cpu: Vec<f64> = variants
        .iter()
        .zip(&runs)
        .map(|(v, runs)| record(report, v, runs))
        .collect();
    let floor_cpu = cpu[3];
    for (variant, cpu) in variants.iter().zip(&cpu).take(3) {
        report.add(
            BENCH,
            1,
            variant,
            "node A's forwarding CPU per packet (minus FLOOR)",
            "ns",
            vec![cpu - floor_cpu],
        );
    }

    let m = |v: &str| report.median(BENCH, 1, v, "forwarded").unwrap_or(f64::NAN);
    let (ours, ipt, nft) = (m("ours"), m("IPT"), m("NFT"));
    let node_a = |v: &str| {
        report
            .median(
                BENCH,
                1,
                v,
                "node A's forwarding CPU per packet (minus FLOOR)",
            )
            .unwrap_or(f64::NAN)
    };
    report.goal(
        BENCH,
        "XDP >= 3x IPT forwarded packets/s",
        format!(
            "{:.2}x IPT, {:.2}x NFT; node A's own CPU per packet: {:.2}x less than IPT's",
            ours / ipt,
            ours / nft,
            node_a("IPT") / node_a("ours")
        ),
        ours / ipt >= 3.0,
    );
}

/// Benchmark 5b: new TCP connections per second from the client (four at once) through the
/// node port to pod-b1 on node B (each SNATed by node A), one request and answer each,
/// closed by a reset as `crr` does, sustained for `plan.connection_seconds` per run: ours (native XDP) against
/// kube-proxy's iptables and nftables rules (netfilter conntrack and NAT) in node A, and
/// DIRECT: the pod's own address, routed by node A without any translation, the ceiling
/// of what node A's translation can reach with this client and server.
pub fn new_connections(report: &mut Report, plan: &Plan) {
    progress("5b: new TCP connections through a node port");
    let mut c = Cluster::new(PORT);
    c.native_peers();
    c.write_manifest("north-south.json", &manifest("tcp"));
    // DIRECT: routes between the client and node B's pods through node A.
    let pods = POD_B[0]
        .rsplit_once('.')
        .map(|(net, _)| format!("{net}.0/24"))
        .expect("IPv4");
    c.client_ns()
        .route(&pods, NODE_A)
        .expect("a route to the pods");
    c.node_b_ns()
        .route(&format!("{CLIENT}/32"), lb_tests::cluster::NODE_A_PEER)
        .expect("a route to the client");
    let baselines = Baseline::both(&[kube_proxy_service("tcp")]);
    let variants = ["ours", "IPT", "NFT", "DIRECT"];
    let mut rates: Vec<Vec<f64>> = variants.iter().map(|_| Vec::new()).collect();
    let mut errors = [0u64; 4];
    let node_port = format!("{NODE_A}:{NODE_PORT}");
    let direct = format!("{}:{PORT}", POD_B[0]);
    // CLIENTS sequential clients at once, so that node A's CPU, not one client's round
    // trips, bounds the rate: the connections per second of all, and their failures.
    let crr = |c: &Cluster, to: &str, seconds: f64| -> (f64, u64) {
        let children: Vec<Child> = (0..CLIENTS)
            .map(|_| {
                command_in(&lb_tests::bin_dir().join("lb-probe"), c.client_ns(), None)
                    .expect("the client namespace")
                    .args(["crr", to, "--seconds", &seconds.to_string()])
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("lb-probe crr")
            })
            .collect();
        let (mut done, mut failed) = (0.0, 0);
        for child in children {
            let out = child.wait_with_output().expect("lb-probe crr");
            assert!(out.status.success(), "lb-probe crr failed");
            let v: Value = serde_json::from_slice(&out.stdout).expect("lb-probe JSON");
            done += v["done"].as_f64().expect("done");
            failed += v["errors"].as_u64().expect("errors");
        }
        (done / seconds, failed)
    };
    for r in 0..plan.connection_reps {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for k in order {
            let (rate, failed) = match variants[k] {
                "DIRECT" => crr(&c, &direct, plan.connection_seconds),
                variant => under(&mut c, variant, &baselines, |c| {
                    let (warm, _) = crr(c, &node_port, 0.2);
                    assert!(warm > 0.0, "{variant}: no connection through the node port");
                    crr(c, &node_port, plan.connection_seconds)
                }),
            };
            rates[k].push(rate);
            errors[k] += failed;
        }
    }
    drop(c);
    for ((variant, runs), failed) in variants.iter().zip(rates).zip(errors) {
        let median = report.add(
            BENCH_CONNECTIONS,
            1,
            variant,
            &format!("connections/s over {} s", plan.connection_seconds),
            "1/s",
            runs,
        );
        report.add(
            BENCH_CONNECTIONS,
            1,
            variant,
            "failed connections (all runs)",
            "",
            vec![failed as f64],
        );
        progress(&format!(
            "   {variant}: {median:.0} connections/s, {failed} failed"
        ));
    }
    let m = |v: &str| {
        report
            .median(
                BENCH_CONNECTIONS,
                1,
                v,
                &format!("connections/s over {} s", plan.connection_seconds),
            )
            .unwrap_or(f64::NAN)
    };
    let (ours, ipt, nft, direct) = (m("ours"), m("IPT"), m("NFT"), m("DIRECT"));
    report.goal(
        BENCH_CONNECTIONS,
        "new connections/s >= 1.5x NFT, none failing",
        format!(
            "{:.2}x NFT, {:.2}x IPT, {:.2}x DIRECT (no translation); {} of ours failed",
            ours / nft,
            ours / ipt,
            ours / direct,
            errors[0]
        ),
        ours / nft >= 1.5 && errors[0] == 0,
    );
}
