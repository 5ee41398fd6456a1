//! lb-demo: ClusterIP traffic balanced by the kernel programs, then NodePort and
//! LoadBalancer traffic from outside balanced in XDP, each in a sandbox that is removed
//! afterwards. Run it with `cargo xtask demo` (as root).
//!
//! The sandbox is a [`World`]: a client namespace in its own cgroup and three backend
//! namespaces running `lb-probe` servers, none with a route out. The agent reads the example
//! manifest embedded below (examples/demo/web.yaml) from a watched directory.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use std::time::Duration;

use lb_tests::{
    cluster::{CLIENT, Cluster, NODE_A, NODE_A_PEER},
    probe::Attempt,
    world::World,
};

/// The demo's manifests, also in the repository as examples/demo/web.yaml.
const MANIFEST: &str = include_str!("../../../examples/demo/web.yaml");
/// The north-south part's manifests (examples/demo/north-south.yaml).
const NORTH_SOUTH: &str = include_str!("../../../examples/demo/north-south.yaml");
const BACKENDS: usize = 3;

fn show(attempts: &[Attempt], what: &str) {
    let mut spread: BTreeMap<String, usize> = BTreeMap::new();
    for (i, a) in attempts.iter().enumerate() {
        let ms = a.micros as f64 / 1000.0;
        match (&a.backend, &a.error) {
            (Some(b), _) => {
                *spread.entry(b.clone()).or_default() += 1;
                let peer = a.peer.as_deref().unwrap_or("?");
                println!(
                    "   #{:<2} {what} -> answered by {b}   ({peer} as the client sees it, {ms:.2} ms)",
                    i + 1
                );
            }
            (None, e) => println!("   #{:<2} {what} -> error {e:?} ({ms:.2} ms)", i + 1),
        }
    }
    let spread: Vec<String> = spread.iter().map(|(b, n)| format!("{b}: {n}")).collect();
    println!("   spread: {}", spread.join(", "));
}

fn section(n: u32, title: &str) {
    println!("\n{n}. {title}");
}

fn demo() {
    println!("lb demo: ClusterIP load balancing by eBPF socket hooks\n");
    let mut w = World::with_backends(BACKENDS, 8080);
    println!(
        "sandbox {}: client + {BACKENDS} backend network namespaces behind a router, no route out;",
        w.tag()
    );
    println!(
        "the client runs in cgroup {}, where the agent attaches its programs.",
        w.cgroup().display()
    );
    for i in 0..BACKENDS {
        println!(
            "   backend b{i}: {} and {}, TCP and UDP on port 8080",
            w.backend_v4(i),
            w.backend_v6(i)
        );
    }
    w.write_manifest("web.yaml", MANIFEST);
    w.start_agent(&[]);
    for frontend in ["10.96.0.10:80/TCP", "[fd00:96::10]:53/UDP"] {
        w.wait_for_backends(frontend, BACKENDS as u16);
    }
    println!(
        "agent: started on examples/demo/web.yaml (service demo/web: 10.96.0.10 and fd00:96::10, ports 80/TCP and 53/UDP)"
    );

    section(1, "TCP: 12 new connections to the ClusterIP 10.96.0.10:80");
    show(
        &w.probe(&["tcp", "10.96.0.10:80", "--count", "12"]),
        "connect 10.96.0.10:80",
    );

    section(
        2,
        "UDP: 6 datagrams to 10.96.0.10:53 from one unconnected socket (like a DNS client)",
    );
    show(
        &w.probe(&["udp", "10.96.0.10:53", "--count", "6"]),
        "sendto 10.96.0.10:53",
    );

    section(3, "IPv6: 6 connections to [fd00:96::10]:80");
    show(
        &w.probe(&["tcp", "[fd00:96::10]:80", "--count", "6"]),
        "connect [fd00:96::10]:80",
    );

    section(4, "lbctl services (read from the pinned maps)");
    print!("{}", indent(&w.lbctl(&["services"]).unwrap_or_else(|e| e)));

    section(
        5,
        "b2 stops being ready: the manifest is edited and the agent updates demo/web only",
    );
    let edited = MANIFEST
        .replace(
            "[10.244.3.2]\n  conditions: {ready: true}",
            "[10.244.3.2]\n  conditions: {ready: false}",
        )
        .replace(
            "[\"fd00:244:3::2\"]\n  conditions: {ready: true}",
            "[\"fd00:244:3::2\"]\n  conditions: {ready: false}",
        );
    assert_ne!(edited, MANIFEST, "the example still lists b2 as ready");
    w.write_manifest("web.yaml", &edited);
    let took = w.wait_for_backends("10.96.0.10:80/TCP", 2);
    println!(
        "   the datapath had 2 backends {:.0} ms after the edit",
        took.as_secs_f64() * 1000.0
    );
    show(
        &w.probe(&["tcp", "10.96.0.10:80", "--count", "9"]),
        "connect 10.96.0.10:80",
    );
    print!(
        "{}",
        indent(
            &w.lbctl(&["service", "10.96.0.10:80/TCP"])
                .unwrap_or_else(|e| e)
        )
    );

    section(6, "datapath counters (lbctl stats)");
    print!("{}", indent(&w.lbctl(&["stats"]).unwrap_or_else(|e| e)));

    w.stop_agent();
    let leftovers = [
        PathBuf::from(format!("/run/netns/{}-c", w.tag())),
        w.cgroup().to_owned(),
        w.pin_dir().to_owned(),
    ];
    drop(w);
    removed(&leftovers);
}

fn removed(leftovers: &[PathBuf]) {
    let left: Vec<String> = leftovers
        .iter()
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if left.is_empty() {
        println!("\nsandbox removed: namespaces, cgroup, programs and pinned maps are gone.");
    } else {
        println!("\nsandbox NOT fully removed: {}", left.join(", "));
    }
}

/// Which pods answered, and the client address each saw.
fn show_seen(attempts: &[Attempt], what: &str) {
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for a in attempts {
        match (&a.backend, &a.client, &a.error) {
            (Some(b), Some(c), _) => *seen.entry((b.clone(), c.clone())).or_default() += 1,
            (_, _, e) => println!("   {what} -> error {e:?}"),
        }
    }
    let mut by_pod: BTreeMap<String, (usize, Vec<String>)> = BTreeMap::new();
    for ((pod, client), n) in seen {
        let ip = client
            .parse::<std::net::SocketAddr>()
            .map(|s| s.ip().to_canonical().to_string())
            .unwrap_or(client);
        let e = by_pod.entry(pod).or_default();
        e.0 += n;
        if !e.1.contains(&ip) {
            e.1.push(ip);
        }
    }
    for (pod, (n, clients)) in by_pod {
        println!(
            "   {what} -> {pod}: {n} answers, client seen as {}",
            clients.join(", ")
        );
    }
}

fn north_south() {
    println!("\nlb demo, part 2: NodePort and LoadBalancer traffic from outside, in XDP\n");
    let mut c = Cluster::new(8080);
    println!(
        "sandbox {}: an external client ({CLIENT}), node-a ({NODE_A}; {NODE_A_PEER} towards node-b) \
         running the agent with XDP on its two devices, pod-a on node-a, pod-b1 and pod-b2 on node-b.",
        c.tag()
    );
    c.write_manifest("north-south.yaml", NORTH_SOUTH);
    c.native_peers();
    c.start_agent(&["--xdp-mode", "native"]);
    c.wait_ready();
    c.wait_until(
        "the frontends are programmed",
        Duration::from_secs(15),
        || {
            c.lbctl_json::<Vec<lb_userspace::cli::ExternalRow>>(&["external"])
                .is_some_and(|rows| {
                    rows.iter()
                        .any(|r| r.frontend == "198.51.100.11:80/TCP" && r.backends == 1)
                })
        },
    );
    println!(
        "agent: started on examples/demo/north-south.yaml (shop/web: Cluster policy; shop/local: Local policy)"
    );

    section(
        7,
        &format!(
            "TCP to the node port {NODE_A}:30080 and the LoadBalancer IP 198.51.100.10:80 (Cluster policy)"
        ),
    );
    let np: std::net::SocketAddr = format!("{NODE_A}:30080").parse().expect("address");
    show_seen(&c.tcp(np, 12), "node port");
    show_seen(
        &c.tcp("198.51.100.10:80".parse().expect("address"), 12),
        "LB IP",
    );
    println!(
        "   (node-b's pods see node-a's address: the flow is SNATed so that replies return through node-a)"
    );

    section(8, "UDP to the node port, a new flow per datagram");
    show_seen(&c.udp(np, 6), "node port/UDP");

    section(
        9,
        "Local policy: 198.51.100.11:80 reaches only node-a's pod, which sees the client itself",
    );
    show_seen(
        &c.tcp("198.51.100.11:80".parse().expect("address"), 6),
        "LB IP",
    );
    match c.http_get(format!("{NODE_A}:32001").parse().expect("address")) {
        Ok((status, body)) => println!(
            "   health check node port {NODE_A}:32001 -> HTTP {status} {}",
            body.split_whitespace().collect::<Vec<_>>().join(" ")
        ),
        Err(e) => println!("   health check node port -> error {e}"),
    }

    section(10, "lbctl external, maglev shop/web and conntrack");
    for args in [
        &["external"][..],
        &["maglev", "shop/web"],
        &["conntrack", "--limit", "8"],
    ] {
        print!("{}", indent(&c.lbctl(args).unwrap_or_else(|e| e)));
    }
    section(
        11,
        "lbctl explain: the XDP program itself run on a built packet, and the agent's reasons",
    );
    let node_port = format!("{NODE_A}:30080");
    let client = format!("{CLIENT}:40000");
    let explain = ["explain", &node_port, "--from", &client];
    print!(
        "{}",
        indent(&c.lbctl_text_in_node(&explain).unwrap_or_else(|e| e))
    );
    let leftovers = [
        PathBuf::from(format!("/run/netns/{}-na", c.tag())),
        PathBuf::from(format!("/sys/fs/bpf/{}", c.tag())),
    ];
    drop(c);
    removed(&leftovers);
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "lb-demo needs root: it creates network namespaces and a cgroup and loads BPF programs."
        );
        return ExitCode::FAILURE;
    }
    demo();
    north_south();
    ExitCode::SUCCESS
}
