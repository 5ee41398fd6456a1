//! What several benchmarks share: the services they load, as kube-proxy's fixture and as
//! manifests, and timing helpers.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{kubeproxy, world::World};
use serde_json::{Value, json};

/// The measured service's frontend (installed last) and endpoints (backend 0's addresses).
pub(super) const TARGET_VIP: Ipv4Addr = Ipv4Addr::new(10, 111, 255, 254);

pub(super) fn target_endpoints() -> Vec<SocketAddrV4> {
    (2..12)
        .map(|h| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, h), 8080))
        .collect()
}

/// `n` ClusterIP services of 10 endpoints each, the measured one last.
pub(super) fn services(n: u64) -> Vec<kubeproxy::Service> {
    let mut out: Vec<kubeproxy::Service> = (1..n)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32);
            kubeproxy::Service {
                name: format!("bench/s{i}:http"),
                frontend: SocketAddrV4::new(vip, 80),
                protocol: "tcp",
                endpoints: (0..10)
                    .map(|b| {
                        SocketAddrV4::new(
                            Ipv4Addr::from(
                                u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i as u32) * 10 + b,
                            ),
                            8080,
                        )
                    })
                    .collect(),
                node_port: None,
            }
        })
        .collect();
    out.push(kubeproxy::Service {
        name: "bench/target:http".into(),
        frontend: SocketAddrV4::new(TARGET_VIP, 80),
        protocol: "tcp",
        endpoints: target_endpoints(),
        node_port: None,
    });
    out
}

/// The same services as manifests for the agent's file source (a v1 List).
pub(super) fn manifest(services: &[kubeproxy::Service]) -> String {
    serde_json::to_string(&json!({"apiVersion": "v1", "kind": "List", "items": objects(services)}))
        .expect("serializes")
}

/// The same services as Service and EndpointSlice objects: `bench/s<i>` with slice
/// `bench/s<i>-1`, `i` counting from 0 in the order given.
pub(super) fn objects(services: &[kubeproxy::Service]) -> Vec<Value> {
    let mut items: Vec<Value> = Vec::with_capacity(services.len() * 2);
    for (i, s) in services.iter().enumerate() {
        let name = format!("s{i}");
        items.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": "bench", "name": name},
            "spec": {"clusterIP": s.frontend.ip().to_string(), "clusterIPs": [s.frontend.ip().to_string()],
                     "ports": [{"name": "http", "port": s.frontend.port(), "protocol": "TCP"}]},
        }));
        let eps: Vec<Value> = s
            .endpoints
            .iter()
            .map(|e| json!({"addresses": [e.ip().to_string()], "conditions": {"ready": true}}))
            .collect();
        items.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": "bench", "name": format!("{name}-1"),
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": s.endpoints[0].port(), "protocol": "TCP"}],
            "endpoints": eps,
        }));
    }
    items
}

pub(super) fn probe_json(mut cmd: Command, args: &[&str]) -> Value {
    let out = cmd
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("running lb-probe");
    assert!(out.status.success(), "lb-probe {args:?} failed");
    serde_json::from_slice(&out.stdout).expect("lb-probe JSON")
}

/// Flags giving the service, slot and backend maps `cap` entries each.
pub(super) fn capacities(cap: &str) -> [&str; 8] {
    [
        "--max-backends",
        cap,
        "--max-slots",
        cap,
        "--max-services",
        cap,
        // Every service is in one namespace, as in a single-tenant cluster, which turns
        // shares off: with the default 50%, half of them would be refused.
        "--namespace-share",
        "100",
    ]
}

/// Starts the agent of `w` with `start` and waits until it logged its first sync; the ms
/// that took.
pub(super) fn timed_start(w: &mut World, start: impl FnOnce(&mut World)) -> f64 {
    let synced = || w.agent_log().matches("initial sync done").count();
    let before = synced();
    let t = Instant::now();
    start(w);
    w.wait_until("the agent synced", Duration::from_secs(120), || {
        w.agent_log().matches("initial sync done").count() > before
    });
    t.elapsed().as_secs_f64() * 1e3
}

/// Stops the agent of `w` and removes everything it programmed, for another cold start.
pub(super) fn stop_and_clean(w: &mut World) {
    w.stop_agent();
    let out = w.run_agent(&["--cleanup"]);
    assert!(out.status.success(), "lb-agent --cleanup failed: {out:?}");
}

/// Runs `f` and returns how long it took, in ms.
pub(super) fn timed(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e3
}
