//! North-south traffic end to end: an external client reaches NodePort and LoadBalancer
//! services through node A, whose agent runs XDP on its external and peer devices, to pods
//! on node A and node B (see `lb_tests::cluster`). One test runs XDP in native mode (as on
//! a NIC), the other in generic mode.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::Duration,
};

use lb_tests::{
    cluster::{
        CLIENT, CLIENT6, Cluster, NODE_A, NODE_A_OVERLAY, NODE_A_OVERLAY6, NODE_A_PEER,
        NODE_A_PEER6, NODE_A6, POD_A, POD_A6, POD_B6,
    },
    manifest::{Ep, documents, slice},
    probe::Attempt,
    require_privileges,
};
use lb_userspace::cli::{AffinityRow, Explanation, ExternalRow, FlowRow, MaglevSummary};
use serde_json::json;

const PORT: u16 = 8080;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A LoadBalancer service on port 80 (TCP and UDP) with node port `node_port`, ingress
/// `lb_ip` and `spec` merged in.
fn lb_service(
    name: &str,
    cluster_ip: &str,
    lb_ip: &str,
    node_port: u16,
    spec: serde_json::Value,
) -> String {
    let mut s = json!({
        "type": "LoadBalancer",
        "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
        "ports": [
            {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": PORT, "nodePort": node_port},
            {"name": "udp", "port": 80, "protocol": "UDP", "targetPort": PORT, "nodePort": node_port},
        ],
    });
    for (k, v) in spec.as_object().expect("an object") {
        s[k] = v.clone();
    }
    serde_json::to_string_pretty(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": name},
        "spec": s,
        "status": {"loadBalancer": {"ingress": [{"ip": lb_ip}]}},
    }))
    .unwrap()
}

fn endpoints(service: &str, pods: &[(&str, &str)]) -> String {
    let eps: Vec<Ep> = pods
        .iter()
        .map(|(ip, node)| Ep::ready(ip).on_node(node))
        .collect();
    slice(
        "shop",
        &format!("{service}-1"),
        service,
        "IPv4",
        &[("tcp", PORT.into(), "TCP"), ("udp", PORT.into(), "UDP")],
        &eps,
    )
}

const ALL_PODS: [(&str, &str); 3] = [
    ("10.244.1.10", "node-a"),
    ("10.244.2.10", "node-b"),
    ("10.244.3.10", "node-b"),
];

fn web(pods: &[(&str, &str)]) -> String {
    documents(&[
        lb_service("web", "10.96.0.10", "198.51.100.10", 30080, json!({})),
        endpoints("web", pods),
    ])
}

fn manifests(c: &Cluster) {
    c.write_manifest("web.yaml", &web(&ALL_PODS));
    c.write_manifest(
        "local.yaml",
        &documents(&[
            lb_service(
                "local",
                "10.96.0.11",
                "198.51.100.11",
                30081,
                json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": 32001,
                       "loadBalancerSourceRanges": ["203.0.113.0/24"]}),
            ),
            endpoints("local", &ALL_PODS[..2]),
        ]),
    );
    c.write_manifest(
        "far.yaml",
        &documents(&[
            lb_service(
                "far",
                "10.96.0.12",
                "198.51.100.12",
                30082,
                json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": 32002}),
            ),
            endpoints("far", &ALL_PODS[2..]),
        ]),
    );
    c.write_manifest(
        "ranged.yaml",
        &documents(&[
            lb_service(
                "ranged",
                "10.96.0.13",
                "198.51.100.13",
                30083,
                json!({"loadBalancerSourceRanges": ["192.0.2.0/24"]}),
            ),
            endpoints("ranged", &ALL_PODS),
        ]),
    );
}

fn externals(c: &Cluster) -> Vec<ExternalRow> {
    c.lbctl_json(&["external"]).unwrap_or_default()
}

fn row(c: &Cluster, frontend: &str) -> Option<ExternalRow> {
    externals(c).into_iter().find(|r| r.frontend == frontend)
}

/// Every attempt answered; the set of backends and, per backend, the client addresses they saw.
fn answered(attempts: &[Attempt]) -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    let backends = Attempt::backends(attempts);
    let seen = attempts
        .iter()
        .map(|a| {
            let client: SocketAddr = a
                .client
                .as_deref()
                .expect("client")
                .parse()
                .expect("address");
            (
                a.backend.clone().expect("backend"),
                client.ip().to_canonical().to_string(),
            )
        })
        .collect();
    (backends, seen)
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(std::string::ToString::to_string).collect()
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn node_ports_and_load_balancer_ips_reach_pods_through_xdp() {
    require_privileges("node_ports_and_load_balancer_ips_reach_pods_through_xdp");
    let mut c = Cluster::new(PORT);
    manifests(&c);
    c.native_peers();
    c.start_agent(&["--xdp-mode", "native"]);
    c.wait_ready();
    c.wait_until(
        "the north-south frontends are programmed",
        Duration::from_secs(15),
        || {
            row(&c, "198.51.100.10:80/TCP").is_some_and(|r| r.backends == 3)
                && row(&c, &format!("{NODE_A}:30080/UDP")).is_some_and(|r| r.backends == 3)
                && row(&c, "198.51.100.11:80/TCP").is_some_and(|r| r.backends == 1)
        },
    );
    let all = names(&["pod-a", "pod-b1", "pod-b2"]);
    // The node port on the node's peer address too, as kube-proxy serves every node address.
    assert!(row(&c, &format!("{NODE_A_PEER}:30080/TCP")).is_some());

    // Cluster policy: every pod, local ones see the client, remote ones node A (SNAT).
    for frontend in [format!("{NODE_A}:30080"), "198.51.100.10:80".to_string()] {
        let tcp = c.tcp(sa(&frontend), 30);
        let (backends, seen) = answered(&tcp);
        assert_eq!(backends, all, "TCP via {frontend}");
        for (backend, client) in &seen {
            let expected = if backend == "pod-a" {
                CLIENT
            } else {
                NODE_A_PEER
            };
            assert_eq!(client, expected, "{backend} via {frontend}");
        }
        let udp = c.udp(sa(&frontend), 12);
        let (backends, _) = answered(&udp);
        assert!(
            backends.len() >= 2,
            "UDP via {frontend} spreads: {backends:?}"
        );
        for a in &udp {
            // Replies come from the frontend the client sent to.
            assert_eq!(a.peer.as_deref(), Some(frontend.as_str()), "{a:?}");
        }
    }

    // Local policy: only node A's pod, which sees the client's own address.
    for frontend in [format!("{NODE_A}:30081"), "198.51.100.11:80".to_string()] {
        let (backends, seen) = answered(&c.tcp(sa(&frontend), 10));
        assert_eq!(backends, names(&["pod-a"]), "TCP via {frontend}");
        assert!(seen.iter().all(|(_, client)| client == CLIENT), "{seen:?}");
        let udp = c.udp(sa(&frontend), 4);
        let (backends, seen) = answered(&udp);
        assert_eq!(backends, names(&["pod-a"]), "UDP via {frontend}");
        assert!(seen.iter().all(|(_, client)| client == CLIENT), "{seen:?}");
    }
    // A Local service without a pod on this node drops the traffic.
    let far = c.tcp(sa("198.51.100.12:80"), 1);
    assert_eq!(far[0].error.as_deref(), Some("ETIMEDOUT"), "{far:?}");
    // The client is outside the source ranges of `ranged`.
    let ranged = c.tcp(sa("198.51.100.13:80"), 1);
    assert_eq!(ranged[0].error.as_deref(), Some("ETIMEDOUT"), "{ranged:?}");

    // Health check node ports, as cloud load balancers probe them.
    let (status, body) = c
        .http_get(sa(&format!("{NODE_A}:32001")))
        .expect("health check");
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["localEndpoints"], 1);
    assert_eq!(body["service"]["name"], "local");
    let (status, body) = c
        .http_get(sa(&format!("{NODE_A}:32002")))
        .expect("health check");
    assert_eq!(status, 503, "{body}");

    // The CLI shows counters, tables and tracked flows.
    let web = row(&c, "198.51.100.10:80/TCP").expect("web");
    assert!(
        web.counters.packets > 0 && web.counters.flows > 0,
        "{web:?}"
    );
    assert_eq!(web.policy, "Cluster");
    let ranged = row(&c, "198.51.100.13:80/TCP").expect("ranged");
    assert!(
        ranged.source_ranges && ranged.counters.drops >= 1,
        "{ranged:?}"
    );
    let tables: Vec<MaglevSummary> = c.lbctl_json(&["maglev", "shop/web"]).expect("maglev");
    assert!(!tables.is_empty());
    for t in &tables {
        assert_eq!(t.shares.len(), 3, "{t:?}");
        assert!(
            t.shares.iter().all(|s| (s.percent - 33.3).abs() < 1.0),
            "{t:?}"
        );
    }
    // The fast path was taken: frames redirected between the node's devices, replies of
    // SNATed flows reversed in XDP, replies of local pods in tc.
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("stats");
    for counter in [
        "xdp_redirected",
        "xdp_reversed",
        "tc_reversed",
        "xdp_drop_no_backend",
        "xdp_drop_source_range",
    ] {
        assert!(stats[counter] > 0, "{counter}: {stats:?}");
    }
    let flows: Vec<FlowRow> = c.lbctl_json(&["conntrack"]).expect("conntrack");
    assert!(
        flows.iter().any(|f| f.service == "shop/web"
            && f.snat.is_some_and(|s| s.ip().to_string() == NODE_A_PEER)),
        "{flows:?}"
    );

    // explain runs the attached program on a built packet: the datapath's own answer.
    let e: Explanation = c
        .lbctl_in_node(&[
            "explain",
            &format!("{NODE_A}:30080"),
            "--from",
            "203.0.113.99:45000",
        ])
        .expect("explain");
    let ns = e.north_south.expect("a north-south frontend");
    assert_eq!(
        (ns.service.as_str(), ns.policy.as_str()),
        ("shop/web", "Cluster")
    );
    assert_eq!(ns.backends.len(), 3);
    let run = ns.datapath.expect("the program ran");
    assert!(
        ["XDP_TX", "XDP_REDIRECT", "XDP_PASS"].contains(&run.verdict.as_str()),
        "{run:?}"
    );
    let to = run.destination.expect("translated");
    assert!(
        ns.backends.iter().any(|b| b.backend == Some(to)),
        "{to} is a backend"
    );
    // A dry run: a remote backend's flow shows the SNAT address with no port taken, a local
    // one's keeps the client; no flow is recorded.
    let from = run.source.expect("translated").to_string();
    if to.ip().to_string() == POD_A {
        assert_eq!(from, "203.0.113.99:45000");
    } else {
        assert_eq!(from, format!("{NODE_A_PEER}:0"));
    }
    let flows: Vec<FlowRow> = c.lbctl_json(&["conntrack"]).expect("conntrack");
    let recorded: Vec<&FlowRow> = flows
        .iter()
        .filter(|f| f.client.ip().to_string() == "203.0.113.99")
        .collect();
    assert!(recorded.is_empty(), "explain recorded {recorded:?}");
    let endpoints = e.endpoints.expect("the agent's verdicts");
    assert_eq!(endpoints.service, "shop/web");
    let outsider: Explanation = c
        .lbctl_in_node(&["explain", "198.51.100.13:80", "--from", "203.0.113.2:45001"])
        .expect("explain");
    let run = outsider.north_south.and_then(|n| n.datapath).expect("ran");
    assert_eq!(run.verdict, "XDP_DROP", "outside the source ranges");

    // Prometheus sees the same counters, per service and per drop reason.
    let (status, text) = c.agent_http("/metrics").expect("metrics");
    assert_eq!(status, 200);
    let m = |series: &str| {
        lb_tests::metric(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    let web_labels = r#"{namespace="shop",service="web",port="tcp"}"#;
    assert!(m(&format!("lb_service_packets_total{web_labels}")) >= web.counters.packets as f64);
    assert!(m(&format!("lb_service_flows_total{web_labels}")) >= web.counters.flows as f64);
    assert!(m(&format!("lb_service_bytes_total{web_labels}")) > 0.0);
    let ranged_labels = r#"{namespace="shop",service="ranged",port="tcp"}"#;
    assert!(m(&format!("lb_service_drops_total{ranged_labels}")) >= 1.0);
    assert!(m(r#"lb_datapath_drops_total{reason="source_range"}"#) >= 1.0);
    assert!(m(r#"lb_datapath_events_total{event="xdp_redirected"}"#) >= 1.0);
    assert!(m(r#"lb_frontends{path="north_south"}"#) >= 1.0);
    assert!(m(r#"lb_map_entries{map="lb_ct_v2"}"#) >= 1.0);
    let (status, body) = c.agent_http("/healthz").expect("healthz");
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(body["nodeEligible"], true);
}

/// A cluster serving `web` over all pods, its agent in generic XDP mode; and web's node
/// port on node A.
fn web_cluster() -> (Cluster, String) {
    let frontend = format!("{NODE_A}:30080");
    let c = started(("web.yaml", &web(&ALL_PODS)), (&frontend, 3), &[]);
    (c, frontend)
}

/// A sandbox with `manifest` (file name, text) written, the agent started in generic XDP
/// mode with `args` added, once `frontend`'s TCP entry (an address and port) is programmed
/// with its `backends`.
fn started(manifest: (&str, &str), (frontend, backends): (&str, usize), args: &[&str]) -> Cluster {
    let mut c = Cluster::new(PORT);
    c.write_manifest(manifest.0, manifest.1);
    start_agent(&mut c, (frontend, backends), args);
    c
}

/// Starts the agent in generic XDP mode with `args` added, and waits until `frontend`'s
/// TCP entry is programmed with its `backends`.
fn start_agent(c: &mut Cluster, (frontend, backends): (&str, usize), args: &[&str]) {
    let mut all = vec!["--xdp-mode", "generic"];
    all.extend_from_slice(args);
    c.start_agent(&all);
    c.wait_ready();
    c.wait_until(
        &format!("{frontend} is programmed"),
        Duration::from_secs(15),
        || row(c, &format!("{frontend}/TCP")).is_some_and(|r| r.backends == backends),
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn health_is_served_to_all_and_metrics_only_on_the_nodes_loopback() {
    require_privileges("health_is_served_to_all_and_metrics_only_on_the_nodes_loopback");
    // The agent's default ports, as kube-proxy's: health on every address, metrics on
    // loopback.
    let (c, _) = web_cluster();
    let outside = |port: u16, path: &str| c.client_http(&format!("{NODE_A}:{port}"), path);
    assert_eq!(outside(10256, "/healthz").map(|(s, _)| s), Ok(200));
    assert_eq!(outside(10256, "/readyz").map(|(s, _)| s), Ok(200));
    assert_eq!(
        outside(10256, "/metrics").map(|(s, _)| s),
        Ok(404),
        "the health port tells nothing of the services"
    );
    assert!(
        outside(10249, "/metrics").is_err(),
        "no metrics from outside the node"
    );
    let (status, body) = c
        .agent_http("/metrics")
        .expect("metrics on node A's loopback");
    assert_eq!(status, 200);
    assert!(body.contains("lb_syncs_total"), "{body}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn session_affinity_keeps_a_client_on_one_backend_from_outside() {
    require_privileges("session_affinity_keeps_a_client_on_one_backend_from_outside");
    let node_port = format!("{NODE_A}:30084");
    let sticky = documents(&[
        lb_service(
            "sticky",
            "10.96.0.14",
            "198.51.100.14",
            30084,
            json!({"sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}}}),
        ),
        endpoints("sticky", &ALL_PODS),
    ]);
    let c = started(("sticky.yaml", &sticky), (&node_port, 3), &[]);
    // 30 connections from one client reach one backend (kube-proxy: the same), through the
    // node port and the load-balancer IP alike (one service port). The UDP port is another
    // service port, with an affinity of its own, as in kube-proxy.
    let mut tcp = c.tcp(sa(&node_port), 30);
    tcp.extend(c.tcp(sa("198.51.100.14:80"), 30));
    let udp = c.udp(sa(&node_port), 10);
    for attempts in [tcp, udp] {
        assert!(attempts.iter().all(|a| a.error.is_none()), "{attempts:?}");
        let (backends, _) = answered(&attempts);
        assert_eq!(backends.len(), 1, "{backends:?}");
    }
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("lbctl stats");
    assert!(stats["xdp_affinity_hit"] >= 60, "{stats:?}");
    // lbctl affinity lists the client once per service port, honoured.
    let rows: Vec<AffinityRow> = c.lbctl_json(&["affinity"]).expect("lbctl affinity");
    let ours: Vec<&AffinityRow> = rows
        .iter()
        .filter(|r| r.service == "shop/sticky" && r.path == "north-south")
        .collect();
    assert_eq!(ours.len(), 2, "{rows:?}");
    assert!(
        ours.iter()
            .all(|r| r.client == CLIENT && r.honoured && r.expires_in_s > 500),
        "{ours:?}"
    );
    let e: Explanation = c
        .lbctl_in_node(&["explain", &node_port, "--agent", "off"])
        .expect("explain");
    assert_eq!(e.north_south.expect("north-south").affinity_timeout_s, 600);
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_spoofed_syn_flood_filling_the_flow_maps_leaves_established_flows_alone() {
    require_privileges("a_spoofed_syn_flood_filling_the_flow_maps_leaves_established_flows_alone");
    const FLOWS: u64 = 4096;
    const SECONDS: u64 = 10;
    const RATE: u64 = 10_000;
    let frontend = format!("{NODE_A}:30080");
    let flows = FLOWS.to_string();
    let c = started(
        ("web.yaml", &web(&ALL_PODS)),
        (&frontend, 3),
        &["--max-flows", &flows, "--max-new-flows", &flows],
    );
    let mut held = c.hold(sa(&frontend));
    let backend = held.first.backend.clone().expect("answered");
    let mut idle = c.hold(sa(&frontend));
    let idle_backend = idle.first.backend.clone().expect("answered");

    // Spoofed SYNs (each a new flow that never completes) turn the map of new flows over
    // dozens of times for 10 s, while one held connection keeps talking (every 20 ms) and
    // the other is silent: answered flows live in a map of their own, which the flood
    // never reaches.
    let mut flood = c.syn_flood(sa(&frontend), SECONDS, RATE);
    let started = std::time::Instant::now();
    let mut pings = 0;
    while flood.child().try_wait().expect("flood runs").is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(SECONDS + 20),
            "flood ends"
        );
        let a = held.ping();
        assert_eq!(
            (a.error.as_deref(), a.backend.as_deref()),
            (None, Some(backend.as_str())),
            "ping {pings} during the flood"
        );
        pings += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(flood.child().stdout.as_mut().expect("piped"), &mut out)
        .expect("flood output");
    let sent: serde_json::Value = serde_json::from_str(&out).expect("flood JSON");
    let sent = sent["sent"].as_u64().expect("a count");
    assert!(sent >= 5 * FLOWS, "only {sent} SYNs sent");
    assert!(pings >= 100, "{pings} pings");
    // The flood did fill the map of new flows, not the answered flows' one, and no packet
    // of a live flow was lost for want of an entry.
    let rows: Vec<lb_userspace::cli::CapacityRow> =
        c.lbctl_json(&["capacity"]).expect("lbctl capacity");
    let row = |map: &str| rows.iter().find(|r| r.map == map).expect("a row").clone();
    let (new, answered) = (row("lb_ctnew_v1"), row("lb_ct_v2"));
    assert!(new.entries * 10 >= new.capacity * 9, "{new:?}");
    assert!(answered.entries <= 4, "only the held flows: {answered:?}");
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("lbctl stats");
    assert_eq!(stats["xdp_drop_no_flow"], 0, "{stats:?}");
    let a = held.ping();
    assert_eq!(a.backend.as_deref(), Some(backend.as_str()));
    // The connection silent through the whole flood is there too.
    let a = idle.ping();
    assert_eq!(
        (a.error.as_deref(), a.backend.as_deref()),
        (None, Some(idle_backend.as_str()))
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_node_port_without_endpoints_refuses_connections_at_once() {
    require_privileges("a_node_port_without_endpoints_refuses_connections_at_once");
    let frontend = format!("{NODE_A}:30080");
    let c = started(("web.yaml", &web(&[])), (&frontend, 0), &[]);
    // As with kube-proxy's REJECT: ECONNREFUSED from the ICMP port unreachable, at once,
    // not a connect timing out.
    for a in c.tcp(sa(&frontend), 3) {
        assert_eq!(a.error.as_deref(), Some("ECONNREFUSED"), "{a:?}");
        assert!(a.micros < 500_000, "{a:?}");
    }
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("lbctl stats");
    assert_eq!(stats["xdp_reject_no_backend"], 3, "{stats:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn node_ports_and_load_balancer_ips_reach_pods_over_ipv6() {
    require_privileges("node_ports_and_load_balancer_ips_reach_pods_over_ipv6");
    let node_port = format!("[{NODE_A6}]:30090");
    let c = started(("web6.yaml", &web6()), (&node_port, 3), &[]);
    let mut attempts = c.tcp(sa(&node_port), 30);
    attempts.extend(c.tcp(sa("[2001:db8:51::10]:80"), 30));
    attempts.extend(c.udp(sa(&node_port), 10));
    assert!(attempts.iter().all(|a| a.error.is_none()), "{attempts:?}");
    let (backends, seen) = answered(&attempts);
    assert_eq!(backends, names(&["pod-a", "pod-b1", "pod-b2"]));
    // The local pod sees the client; the remote ones node A's address towards them (SNAT).
    for (backend, ip) in &seen {
        let want = if backend == "pod-a" {
            CLIENT6
        } else {
            NODE_A_PEER6
        };
        assert_eq!(ip, want, "{backend}");
    }
    let flows: Vec<FlowRow> = c.lbctl_json(&["conntrack"]).expect("conntrack");
    assert!(
        flows
            .iter()
            .any(|f| f.snat.is_some_and(|s| s.ip().to_string() == NODE_A_PEER6)),
        "{flows:?}"
    );
    // Translated in XDP both ways (replies of SNATed flows in XDP, of the local pod in tc).
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("stats");
    for counter in ["xdp_translated", "xdp_reversed", "tc_reversed"] {
        assert!(stats[counter] > 0, "{counter}: {stats:?}");
    }
}

/// An IPv6 LoadBalancer service `web6` (node port 30090, ingress 2001:db8:51::10) over the
/// three pods' IPv6 addresses.
fn web6() -> String {
    let spec = json!({
        "clusterIP": "fd00:96::20", "clusterIPs": ["fd00:96::20"],
        "ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack",
    });
    let pods = [
        (POD_A6, "node-a"),
        (POD_B6[0], "node-b"),
        (POD_B6[1], "node-b"),
    ];
    let eps: Vec<Ep> = pods
        .iter()
        .map(|(ip, node)| Ep::ready(ip).on_node(node))
        .collect();
    let mut service: serde_json::Value = serde_json::from_str(&lb_service(
        "web6",
        "fd00:96::20",
        "2001:db8:51::10",
        30090,
        spec,
    ))
    .expect("JSON");
    service["status"]["loadBalancer"]["ingress"][0]["ip"] = json!("2001:db8:51::10");
    documents(&[
        service.to_string(),
        slice(
            "shop",
            "web6-1",
            "web6",
            "IPv6",
            &[("tcp", PORT.into(), "TCP"), ("udp", PORT.into(), "UDP")],
            &eps,
        ),
    ])
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn pods_behind_a_vxlan_overlay_are_reached_snated_and_answer_back() {
    require_privileges("pods_behind_a_vxlan_overlay_are_reached_snated_and_answer_back");
    // Node A reaches node B's pods through vx0, which runs no XDP. Flows to them are SNATed
    // all the same (the agent knows they run on node B), and their replies, which arrive on
    // vx0, are reversed there by the overlay program.
    let mut c = Cluster::with_overlay(PORT);
    c.write_manifest("web.yaml", &web(&ALL_PODS));
    c.write_manifest("web6.yaml", &web6());
    let (node_port, node_port6) = (format!("{NODE_A}:30080"), format!("[{NODE_A6}]:30090"));

    // Without the overlay program the replies reach node A's stack, which resets them: the
    // pods on node B are out of reach, and the datapath says why.
    start_agent(&mut c, (&node_port, 3), &["--overlay-devices", "none"]);
    let attempts = c.tcp(sa(&node_port), 6);
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("stats");
    assert!(stats["xdp_snat_unwatched_device"] > 0, "{stats:?}");
    assert!(attempts.iter().any(|a| a.error.is_some()), "{attempts:?}");
    c.kill_agent();

    // By default the agent finds vx0 (a VXLAN device) and runs the overlay program on it.
    start_agent(&mut c, (&node_port, 3), &[]);
    c.wait_until(
        "the overlay program runs on vx0",
        Duration::from_secs(10),
        || {
            c.agent_log()
                .lines()
                .any(|l| l.contains("(overlay: tc ingress)") && l.contains("device=vx0"))
        },
    );
    let mut attempts = c.tcp(sa(&node_port), 30);
    attempts.extend(c.tcp(sa("198.51.100.10:80"), 10));
    attempts.extend(c.udp(sa(&node_port), 10));
    attempts.extend(c.tcp(sa(&node_port6), 30));
    attempts.extend(c.udp(sa(&node_port6), 10));
    assert!(attempts.iter().all(|a| a.error.is_none()), "{attempts:?}");
    let (backends, seen) = answered(&attempts);
    assert_eq!(backends, names(&["pod-a", "pod-b1", "pod-b2"]));
    // The local pod sees the client; node B's pods node A's address on the overlay.
    for (backend, ip) in &seen {
        let want = match (backend.as_str(), ip.contains(':')) {
            ("pod-a", false) => CLIENT,
            ("pod-a", true) => CLIENT6,
            (_, false) => NODE_A_OVERLAY,
            (_, true) => NODE_A_OVERLAY6,
        };
        assert_eq!(ip, want, "{backend}");
    }
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("stats");
    assert!(stats["overlay_reversed"] > 0, "{stats:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_external_ip_equal_to_a_node_address_is_refused() {
    require_privileges("an_external_ip_equal_to_a_node_address_is_refused");
    // A tenant's service lists node A's own address among its externalIPs, to take the
    // node's port 9999 (any port of the node: SSH, the kubelet) in XDP. It is refused, with
    // a warning and a metric; its other external IP is served.
    let spec = json!({"externalIPs": [NODE_A, "198.51.100.50"],
                      "ports": [{"name": "tcp", "port": 9999, "protocol": "TCP",
                                 "targetPort": PORT}]});
    let grab = documents(&[
        lb_service("grab", "10.96.0.40", "198.51.100.40", 30099, spec),
        endpoints("grab", &ALL_PODS[..1]),
    ]);
    let c = started(("grab.yaml", &grab), ("198.51.100.50:9999", 1), &[]);
    assert!(
        row(&c, &format!("{NODE_A}:9999/TCP")).is_none(),
        "{:?}",
        externals(&c)
    );
    let attempts = c.tcp(sa("198.51.100.50:9999"), 3);
    assert_eq!(Attempt::backends(&attempts), names(&["pod-a"]));
    assert!(
        c.agent_log().contains(&format!(
            "external IP {NODE_A} is not honoured: it is an address of this node"
        )),
        "the refusal is logged"
    );
    let (_, metrics) = c.agent_http("/metrics").expect("metrics");
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("lb_external_ips_refused_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(refused.is_some_and(|n| n >= 1.0), "{refused:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn strict_reverse_path_filtering_on_an_xdp_device_is_warned_about() {
    require_privileges("strict_reverse_path_filtering_on_an_xdp_device_is_warned_about");
    // With rp_filter 1, IPv4 flows XDP SNATs and hands to the stack (into an overlay) are
    // dropped as martians (tried: the VXLAN test fails so); the agent says what to set.
    let mut c = Cluster::new(PORT);
    c.node_a_ns()
        .sysctl("net/ipv4/conf/all/rp_filter", "1")
        .expect("sysctl");
    c.write_manifest("web.yaml", &web(&ALL_PODS));
    start_agent(&mut c, (&format!("{NODE_A}:30080"), 3), &[]);
    let log = c.agent_log();
    for dev in ["n-ext", "n-peer"] {
        assert!(
            log.lines()
                .any(|l| l.contains("strict reverse-path filtering") && l.contains(dev)),
            "{dev} is warned about"
        );
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_closed_udp_port_behind_a_node_port_is_refused_from_the_frontend() {
    require_privileges("a_closed_udp_port_behind_a_node_port_is_refused_from_the_frontend");
    // Nothing listens on port 9999 of the pods: each answers a datagram with an ICMP port
    // unreachable. The local pod's leaves by tc egress, the remote pod's (SNATed) comes back
    // through XDP; both reach the client from the node port, so its connected socket gets
    // ECONNREFUSED at once (with the errors untranslated it would wait for its timeout).
    let closed = |name: &str, node_port: u16, pod: (&str, &str)| {
        let spec = json!({"ports": [{"name": "udp", "port": 80, "protocol": "UDP",
                                     "targetPort": 9999, "nodePort": node_port}]});
        let last = node_port - 30000;
        let (cluster_ip, lb_ip) = (format!("10.96.0.{last}"), format!("198.51.100.{last}"));
        documents(&[
            lb_service(name, &cluster_ip, &lb_ip, node_port, spec),
            slice(
                "shop",
                &format!("{name}-1"),
                name,
                "IPv4",
                &[("udp", 9999, "UDP")],
                &[Ep::ready(pod.0).on_node(pod.1)],
            ),
        ])
    };
    let mut c = Cluster::new(PORT);
    c.write_manifest("here.yaml", &closed("here", 30086, ALL_PODS[0]));
    c.write_manifest("there.yaml", &closed("there", 30087, ALL_PODS[1]));
    c.start_agent(&["--xdp-mode", "generic"]);
    c.wait_ready();
    c.wait_until("both are programmed", Duration::from_secs(15), || {
        [30086, 30087]
            .iter()
            .all(|p| row(&c, &format!("{NODE_A}:{p}/UDP")).is_some_and(|r| r.backends == 1))
    });
    for node_port in [30086, 30087] {
        let addr = format!("{NODE_A}:{node_port}");
        for _ in 0..3 {
            let attempts = c.probe(&["udp", &addr, "--connected", "--timeout-ms", "2000"]);
            assert_eq!(attempts.len(), 1);
            let a = &attempts[0];
            assert_eq!(a.error.as_deref(), Some("ECONNREFUSED"), "{addr}: {a:?}");
            assert!(a.micros < 1_000_000, "refused at once: {a:?}");
        }
    }
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("stats");
    assert!(stats["tc_icmp_translated"] >= 3, "{stats:?}");
    assert!(stats["xdp_icmp_translated"] >= 3, "{stats:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn path_mtu_discovery_works_through_a_node_port() {
    require_privileges("path_mtu_discovery_works_through_a_node_port");
    let frontend = format!("{NODE_A}:30080");
    let c = started(("web.yaml", &web(&[ALL_PODS[1]])), (&frontend, 1), &[]);
    // The link between the nodes is narrower than the client's and the pod's: the client's
    // full-size segments (the pod's MSS allows them) do not fit the route node A translates
    // them onto. Node A answers "fragmentation needed" as from a router, about the client's
    // own segment, and the client sends smaller ones: a 4000-byte request goes through.
    // (Left to the stack, the answer would go to the SNAT address, node A itself, and the
    // connection would hang.)
    for (ns, dev) in [(c.node_a_ns(), "n-peer"), (c.node_b_ns(), "eth0")] {
        ns.ip(&["link", "set", dev, "mtu", "1280"])
            .expect("ip link set mtu");
    }
    let attempts = c.tcp_sized(sa(&frontend), 3, 4000);
    assert!(attempts.iter().all(|a| a.error.is_none()), "{attempts:?}");
    assert_eq!(Attempt::backends(&attempts), names(&["pod-b1"]));
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("lbctl stats");
    assert!(stats["xdp_too_big"] >= 1, "{stats:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn removing_one_backend_keeps_established_flows_to_the_others() {
    require_privileges("removing_one_backend_keeps_established_flows_to_the_others");
    let (c, frontend) = web_cluster();
    // Held connections until one is on node A's pod and one on pod-b1.
    let mut held = Vec::new();
    let mut on = BTreeSet::new();
    for _ in 0..40 {
        let h = c.hold(sa(&frontend));
        let backend = h
            .first
            .backend
            .clone()
            .expect("the held connection is answered");
        if backend != "pod-b2" && on.insert(backend) {
            held.push(h);
        }
        if on.len() == 2 {
            break;
        }
    }
    assert_eq!(on, names(&["pod-a", "pod-b1"]), "connections were spread");

    c.write_manifest("web.yaml", &web(&[ALL_PODS[0], ALL_PODS[1]]));
    c.wait_until("pod-b2 left the table", Duration::from_secs(15), || {
        row(&c, &format!("{frontend}/TCP")).is_some_and(|r| r.backends == 2)
    });
    for h in &mut held {
        let before = h.first.backend.clone();
        let now = h.ping();
        assert_eq!(
            now.error, None,
            "the held connection to {before:?} still works"
        );
        assert_eq!(now.backend, before);
    }
    let (backends, _) = answered(&c.tcp(sa(&frontend), 20));
    assert_eq!(backends, names(&["pod-a", "pod-b1"]));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_restarted_agent_keeps_north_south_flows_and_cleanup_detaches_xdp() {
    require_privileges("a_restarted_agent_keeps_north_south_flows_and_cleanup_detaches_xdp");
    let (mut c, frontend) = web_cluster();
    let mut held: Vec<_> = (0..6).map(|_| c.hold(sa(&frontend))).collect();
    for h in &held {
        assert_eq!(h.first.error, None, "{:?}", h.first);
    }
    assert!(
        c.node_link("n-ext").contains("xdpgeneric"),
        "{}",
        c.node_link("n-ext")
    );

    // Killed: the pinned links and maps keep serving, old flows and new ones.
    c.kill_agent();
    for h in &mut held {
        let a = h.ping();
        assert_eq!((a.error, a.backend), (None, h.first.backend.clone()));
    }
    let (backends, _) = answered(&c.tcp(sa(&frontend), 10));
    assert!(!backends.is_empty());

    // Restarted: it adopts the maps and replaces the programs on the same links.
    c.start_agent(&["--xdp-mode", "generic"]);
    c.wait_until(
        "the restarted agent synced",
        Duration::from_secs(15),
        || c.agent_log().matches("initial sync done").count() == 2,
    );
    let log = c.agent_log();
    let second = &log[log.rfind("datapath ready").expect("a second start")..];
    assert_eq!(
        second
            .matches("north-south programs replaced in place")
            .count(),
        2,
        "{second}"
    );
    assert!(!second.contains("ERROR"), "{second}");
    for h in &mut held {
        let a = h.ping();
        assert_eq!((a.error, a.backend), (None, h.first.backend.clone()));
    }

    // Cleanup detaches XDP and tc from the devices.
    c.kill_agent();
    assert!(c.cleanup());
    let link = c.node_link("n-ext");
    assert!(!link.contains("xdp"), "{link}");
    let net = c.node_links();
    assert!(!net.contains("n-ext") && !net.contains("n-peer"), "{net}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn many_short_connections_through_a_small_snat_range_all_succeed() {
    require_privileges("many_short_connections_through_a_small_snat_range_all_succeed");
    // Sequential short connections (one request, closed by the client) to a node port whose
    // only backend is on node B, so each is SNATed: 256 ports serve them all, as each port
    // comes back when its flow closes. Bounded in count and time.
    let count: u32 = std::env::var("LB_SNAT_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let frontend = format!("{NODE_A}:30080");
    let c = started(
        ("web.yaml", &web(&[ALL_PODS[1]])),
        (&frontend, 1),
        &[
            "--snat-ports",
            "61000-61255",
            "--conntrack-tcp-timeout-close",
            "1s",
            "--conntrack-gc-interval",
            "1s",
        ],
    );
    let started = std::time::Instant::now();
    let attempts = c.tcp(sa(&frontend), count);
    let took = started.elapsed();
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| a.error.is_some()).collect();
    assert_eq!(attempts.len(), count as usize);
    assert!(
        failed.is_empty(),
        "{} of {count} failed, first {:?}",
        failed.len(),
        failed.first()
    );
    let (backends, seen) = answered(&attempts);
    assert_eq!(backends, names(&["pod-b1"]));
    assert_eq!(
        seen.iter()
            .map(|(_, ip)| ip.as_str())
            .collect::<BTreeSet<_>>(),
        [NODE_A_PEER].into(),
        "SNATed to node A's address"
    );
    let stats: BTreeMap<String, u64> = c.lbctl_json(&["stats"]).expect("lbctl stats");
    assert_eq!(stats["xdp_drop_no_snat_port"], 0, "{stats:?}");
    assert_eq!(stats["xdp_drop_no_flow"], 0, "{stats:?}");
    // At most one flow per port at any time: a port taken over takes its old flow along.
    let flows: Vec<FlowRow> = c.lbctl_json(&["conntrack"]).expect("lbctl conntrack");
    assert!(flows.len() <= 256, "{} flows tracked", flows.len());
    // Closed flows expire after a second, and the sweep removes them.
    c.wait_until(
        "the closed flows are swept",
        Duration::from_secs(10),
        || {
            c.lbctl_json::<Vec<FlowRow>>(&["conntrack"])
                .is_some_and(|f| f.is_empty())
        },
    );
    eprintln!(
        "{count} connections in {:.1}s, {} SNAT ports reused",
        took.as_secs_f64(),
        stats["snat_port_reused"]
    );
}
