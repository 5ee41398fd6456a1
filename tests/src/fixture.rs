//! The usual world: backends serving TCP and UDP, and a dual-stack service `demo/web` over
//! them (port 80/TCP and 53/UDP, to 8080 on the backends).

use crate::{
    manifest::{Ep, documents, service, slice},
    world::World,
};

/// The service's IPv4 cluster IP.
pub const WEB_V4: &str = "10.96.0.10";
/// The service's IPv6 cluster IP.
pub const WEB_V6: &str = "fd00:96::10";
/// The port the backends serve on.
pub const BACKEND_PORT: u16 = 8080;

/// The manifest of `demo/web` with the given backends (by index) ready.
pub fn web_manifest(w: &World, backends: &[usize]) -> String {
    let port = i64::from(BACKEND_PORT);
    let ports = [("http", port, "TCP"), ("dns", port, "UDP")];
    let v4: Vec<Ep> = backends
        .iter()
        .map(|&i| Ep::ready(w.backend_v4(i)))
        .collect();
    let v6: Vec<Ep> = backends
        .iter()
        .map(|&i| Ep::ready(w.backend_v6(i)))
        .collect();
    documents(&[
        service(
            "demo",
            "web",
            &[WEB_V4, WEB_V6],
            &[("http", 80, "TCP"), ("dns", 53, "UDP")],
        ),
        slice("demo", "web-v4", "web", "IPv4", &ports, &v4),
        slice("demo", "web-v6", "web", "IPv6", &ports, &v6),
    ])
}

/// A world with `n` backends named `b0`.., `demo/web` over all of them, and the agent
/// started (with `agent_args`) and synced.
pub fn web_world(n: usize, agent_args: &[&str]) -> World {
    let mut w = World::with_backends(n, BACKEND_PORT);
    let all: Vec<usize> = (0..n).collect();
    w.write_manifest("web.yaml", &web_manifest(&w, &all));
    w.start_agent(agent_args);
    for frontend in [format!("{WEB_V4}:80/TCP"), format!("[{WEB_V6}]:53/UDP")] {
        w.wait_for_backends(&frontend, n as u16);
    }
    w
}

/// A second service, `demo/other` on 10.96.0.20:80/TCP, over backend 0.
pub fn other_manifest(w: &World) -> String {
    documents(&[
        service("demo", "other", &["10.96.0.20"], &[("", 80, "TCP")]),
        slice(
            "demo",
            "other-1",
            "other",
            "IPv4",
            &[("", i64::from(BACKEND_PORT), "TCP")],
            &[Ep::ready(w.backend_v4(0))],
        ),
    ])
}
