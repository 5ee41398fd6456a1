//! lb-demo: ClusterIP traffic balanced by the kernel programs, in a sandbox that is removed
//! afterwards. Run it with `cargo xtask demo` (as root).
//!
//! The sandbox is a [`World`]: a client namespace in its own cgroup and three backend
//! namespaces running `lb-probe` servers, none with a route out. The agent reads the example
//! manifest embedded below (examples/demo/web.yaml) from a watched directory.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use lb_tests::{probe::Attempt, world::World};

/// The demo's manifests, also in the repository as examples/demo/web.yaml.
const MANIFEST: &str = include_str!("../../../examples/demo/web.yaml");
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
    ExitCode::SUCCESS
}
