//! Benchmarks 2, 3, 4 and 6: socket-level ClusterIP load balancing (connect latency,
//! short-connection rate, request/response latency, cold sync) against direct connections
//! (DIRECT) and kube-proxy's iptables (IPT) and nftables (NFT) modes.

use std::{fs, process::Stdio};

use lb_tests::{bench::Report, kubeproxy, run, world::World};
use serde_json::Value;

use crate::{
    Plan,
    fixture::{
        TARGET_VIP, capacities, manifest, probe_json, services, stop_and_clean, target_endpoints,
        timed, timed_start,
    },
    hookstats, progress,
};

/// A benchmark client: a variant's name, whether it runs in the world's cgroup (where the
/// socket hooks are), and what it connects to.
pub(super) struct Client {
    variant: &'static str,
    in_cgroup: bool,
    addr: String,
}

/// Runs `measure` for every client, `reps` times, alternating which client goes first so
/// drift during the run does not favour one; the values per client.
pub(super) fn interleaved<T>(
    reps: usize,
    clients: &[Client],
    mut measure: impl FnMut(&Client) -> T,
) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = clients.iter().map(|_| Vec::new()).collect();
    for r in 0..reps {
        let mut order: Vec<usize> = (0..clients.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            out[i].push(measure(&clients[i]));
        }
    }
    out
}

/// One repetition of connect latency: (p50, p99) in µs.
pub(super) fn connect_rep(w: &World, plan: &Plan, c: &Client) -> (f64, f64) {
    let count = plan.connects.to_string();
    let v = probe_json(
        w.client_command(c.in_cgroup),
        &["connect-loop", &c.addr, "--count", &count],
    );
    assert_eq!(v["errors"], 0, "connects to {} failed: {v}", c.addr);
    (
        v["p50_us"].as_f64().unwrap_or(f64::NAN),
        v["p99_us"].as_f64().unwrap_or(f64::NAN),
    )
}

/// One repetition of the connection rate with `clients` processes, per second.
pub(super) fn crr_rep(w: &World, plan: &Plan, c: &Client, clients: usize) -> f64 {
    let seconds = plan.crr_seconds.to_string();
    let children: Vec<_> = (0..clients)
        .map(|_| {
            let mut cmd = w.client_command(c.in_cgroup);
            cmd.args(["crr", &c.addr, "--seconds", &seconds])
                .stdout(Stdio::piped());
            cmd.spawn().expect("spawning lb-probe crr")
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().expect("lb-probe crr");
            let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
            v["done"].as_f64().unwrap_or(0.0) / plan.crr_seconds
        })
        .sum()
}

/// One repetition of request/response round trips: (p50, p99) in µs.
pub(super) fn rr_rep(w: &World, plan: &Plan, c: &Client) -> (f64, f64) {
    let count = plan.round_trips.to_string();
    let v = probe_json(
        w.client_command(c.in_cgroup),
        &["rr", &c.addr, "--count", &count],
    );
    assert_eq!(v["errors"], 0, "round trips to {} failed: {v}", c.addr);
    (
        v["p50_us"].as_f64().unwrap_or(f64::NAN),
        v["p99_us"].as_f64().unwrap_or(f64::NAN),
    )
}

/// Measures connect latency, connection rates and (with `rr`) round trips of `clients`,
/// interleaved, into the report.
pub(super) fn measure_clients(
    report: &mut Report,
    w: &World,
    plan: &Plan,
    n: u64,
    clients: &[Client],
    rr: bool,
) {
    for (c, reps) in clients
        .iter()
        .zip(interleaved(plan.reps, clients, |c| connect_rep(w, plan, c)))
    {
        let (p50, p99): (Vec<f64>, Vec<f64>) = reps.into_iter().unzip();
        report.add("2-connect", n, c.variant, "connect p50", "µs", p50);
        report.add("2-connect", n, c.variant, "connect p99", "µs", p99);
    }
    for procs in [1usize, 2] {
        let metric = format!("{procs} client(s)");
        for (c, reps) in clients.iter().zip(interleaved(plan.reps, clients, |c| {
            crr_rep(w, plan, c, procs)
        })) {
            report.add("3-crr", n, c.variant, &metric, "conn/s", reps);
        }
    }
    if rr {
        for (c, reps) in clients
            .iter()
            .zip(interleaved(plan.reps, clients, |c| rr_rep(w, plan, c)))
        {
            let (p50, p99): (Vec<f64>, Vec<f64>) = reps.into_iter().unzip();
            report.add("4-rr", n, c.variant, "round trip p50", "µs", p50);
            report.add("4-rr", n, c.variant, "round trip p99", "µs", p99);
        }
    }
}

/// The connect4 hook's own run time per connect (kernel `bpf_stats`) under `plan.connects`
/// connects of `ours`, `plan.reps` times, into benchmark 1.
pub(super) fn connect_hook_cost(
    report: &mut Report,
    w: &World,
    plan: &Plan,
    n: u64,
    ours: &Client,
) {
    let Some(id) = hookstats::program(w.cgroup(), "cgroup_inet4_connect") else {
        report
            .notes
            .push("1: the connect4 program was not found with bpftool".into());
        return;
    };
    let stats = match hookstats::enable() {
        Ok(fd) => fd,
        Err(e) => {
            report.notes.push(format!(
                "1: BPF_ENABLE_STATS failed ({e}); socket hook cost not measured"
            ));
            return;
        }
    };
    let reps: Vec<f64> = (0..plan.reps)
        .map(|_| {
            let (t0, n0) = hookstats::counters(id);
            connect_rep(w, plan, ours);
            let (t1, n1) = hookstats::counters(id);
            (t1 - t0) / (n1 - n0).max(1.0)
        })
        .collect();
    drop(stats);
    report.add(
        "1-program-cost",
        n,
        "ours",
        "cgroup/connect4 (bpf_stats), per connect",
        "ns/run",
        reps,
    );
}

/// Loads `input` with `loader` (the file's path appended) in the client namespace; the ms
/// it took.
pub(super) fn in_client(w: &World, loader: &[&str], input: &str) -> f64 {
    let program = loader[0];
    // In the world's temp dir (not its watched manifests dir), removed with the world, also
    // when a load fails.
    let path = w
        .manifests()
        .parent()
        .expect("the manifests dir is in the world's dir")
        .join(format!("{program}.rules"));
    fs::write(&path, input).expect("writing rules");
    let mut all: Vec<&str> = vec!["netns", "exec", w.client_ns().name()];
    all.extend_from_slice(loader);
    let file = path.to_string_lossy().into_owned();
    all.push(&file);
    let ms = timed(|| {
        run("ip", &all).unwrap_or_else(|e| panic!("{program}: {e}"));
    });
    let _ = fs::remove_file(&path);
    ms
}

/// A kube-proxy baseline: its rules, how they are loaded (the rules file is appended to
/// `loader`) and the commands that remove them again.
pub(super) struct Baseline {
    pub(super) variant: &'static str,
    pub(super) loader: &'static [&'static str],
    pub(super) rules: String,
    pub(super) teardown: &'static [&'static [&'static str]],
}

impl Baseline {
    /// kube-proxy's iptables and nftables modes for `svcs`.
    pub(super) fn both(svcs: &[kubeproxy::Service]) -> [Self; 2] {
        [
            Self {
                variant: "IPT",
                loader: &["iptables-restore"],
                rules: kubeproxy::iptables(svcs),
                teardown: &[
                    &["iptables", "-t", "nat", "-F"],
                    &["iptables", "-t", "nat", "-X"],
                ],
            },
            Self {
                variant: "NFT",
                loader: &["nft", "-f"],
                rules: kubeproxy::nftables(svcs),
                teardown: &[&["nft", "delete", "table", "ip", "kube-proxy"]],
            },
        ]
    }
}

pub(super) fn cluster(report: &mut Report, plan: &Plan, n: u64) {
    progress(&format!("2-4, 6: socket-level benchmarks at {n} services"));
    let mut w = World::with_backends(1, 8080);
    for h in 3..12 {
        w.backend_ns(0)
            .addr("eth0", &format!("10.244.1.{h}/24"))
            .expect("backend address");
    }
    let svcs = services(n);
    w.write_manifest("bench.json", &manifest(&svcs));
    let cap = (n * 10 + 1024).max(65_536).to_string();
    let flags = capacities(&cap);
    let cold = timed_start(&mut w, |w| w.start_agent(&flags));
    progress(&format!(
        "   agent synced {n} services in {cold:.0} ms; ours and DIRECT"
    ));
    let vip = format!("{TARGET_VIP}:80");
    let direct = format!("{}:8080", target_endpoints()[0].ip());

    // Socket-level: ours (client in the cgroup) and DIRECT (outside it, no translation).
    let clients = [
        Client {
            variant: "ours",
            in_cgroup: true,
            addr: vip.clone(),
        },
        Client {
            variant: "DIRECT",
            in_cgroup: false,
            addr: direct.clone(),
        },
    ];
    measure_clients(report, &w, plan, n, &clients, true);
    connect_hook_cost(report, &w, plan, n, &clients[0]);
    // More cold starts, each from an empty datapath.
    let mut colds = vec![cold];
    for _ in 1..plan.reps {
        stop_and_clean(&mut w);
        colds.push(timed_start(&mut w, |w| w.start_agent(&flags)));
    }
    report.add("6-cold-sync", n, "ours", "all entries written", "ms", colds);

    // IPT: kube-proxy's iptables layout in the client namespace (clients outside the cgroup).
    // Netfilter translates after the route lookup, so the service range needs a route, as
    // a node's default route gives it: to the router, which has none, so an untranslated
    // packet still stays in the sandbox.
    w.client_ns()
        .route("10.96.0.0/12", "10.244.0.1")
        .expect("route to the service range");
    let client_ns = w.client_ns().name().to_owned();
    for Baseline {
        variant,
        loader,
        rules,
        teardown,
    } in Baseline::both(&svcs)
    {
        progress(&format!("   {variant}"));
        // Loads from empty rules: repeated, except where one load takes minutes (nft -f
        // of 10k services).
        let mut loads = vec![in_client(&w, loader, &rules)];
        while loads.len() < plan.reps && loads.iter().sum::<f64>() < 60_000.0 {
            for cmd in teardown {
                let mut all = vec!["netns", "exec", client_ns.as_str()];
                all.extend_from_slice(cmd);
                run("ip", &all).unwrap_or_else(|e| panic!("removing the {variant} rules: {e}"));
            }
            loads.push(in_client(&w, loader, &rules));
        }
        report.add(
            "6-cold-sync",
            n,
            variant,
            "all entries written",
            "ms",
            loads,
        );
        let client = [Client {
            variant,
            in_cgroup: false,
            addr: vip.clone(),
        }];
        measure_clients(report, &w, plan, n, &client, false);
        for cmd in teardown {
            let mut all = vec!["netns", "exec", client_ns.as_str()];
            all.extend_from_slice(cmd);
            run("ip", &all).unwrap_or_else(|e| panic!("removing the {variant} rules: {e}"));
        }
    }
    drop(w);

    goals_at(report, n);
}

pub(super) fn goals_at(report: &mut Report, n: u64) {
    let measured = report.clone();
    let hook = |scale: u64| {
        measured.median(
            "1-program-cost",
            scale,
            "ours",
            "cgroup/connect4 (bpf_stats), per connect",
        )
    };
    if n > 1
        && let (Some(one), Some(here)) = (hook(1), hook(n))
    {
        report.goal(
            "1-program-cost",
            &format!("connect4 hook {n}/1 services ratio <= 1.15 (O(1))"),
            format!("{:.2} ({one:.0} ns at 1, {here:.0} ns at {n})", here / one),
            here / one <= 1.15,
        );
    }
    let m = |b: &str, v: &str, metric: &str| measured.median(b, n, v, metric).unwrap_or(f64::NAN);
    let (ours, direct, ipt) = (
        m("2-connect", "ours", "connect p50"),
        m("2-connect", "DIRECT", "connect p50"),
        m("2-connect", "IPT", "connect p50"),
    );
    report.goal(
        "2-connect",
        &format!("p50 <= 1.05x DIRECT at {n} services"),
        format!("{:.2}x", ours / direct),
        ours / direct <= 1.05,
    );
    if n >= 10_000 {
        report.goal(
            "2-connect",
            &format!(">= 1.5x faster than IPT at {n} services"),
            format!("{:.2}x", ipt / ours),
            ipt / ours >= 1.5,
        );
    }
    for clients in [1usize, 2] {
        let metric = format!("{clients} client(s)");
        let (o, d, i, f) = (
            m("3-crr", "ours", &metric),
            m("3-crr", "DIRECT", &metric),
            m("3-crr", "IPT", &metric),
            m("3-crr", "NFT", &metric),
        );
        report.goal(
            "3-crr",
            &format!(">= 0.95x DIRECT, {metric}, {n} services"),
            format!("{:.2}x", o / d),
            o / d >= 0.95,
        );
        if n == 1 {
            report.goal(
                "3-crr",
                &format!(">= 1.0x IPT, {metric}, 1 service"),
                format!("{:.2}x", o / i),
                o / i >= 1.0,
            );
        }
        if n >= 10_000 {
            report.goal(
                "3-crr",
                &format!(">= 1.5x IPT and >= 1.1x NFT, {metric}, {n} services"),
                format!("{:.2}x IPT, {:.2}x NFT", o / i, o / f),
                o / i >= 1.5 && o / f >= 1.1,
            );
        }
    }
    for q in ["p50", "p99"] {
        let metric = format!("round trip {q}");
        let (o, d) = (m("4-rr", "ours", &metric), m("4-rr", "DIRECT", &metric));
        report.goal(
            "4-rr",
            &format!("{q} <= 1.02x DIRECT at {n} services"),
            format!("{:.3}x", o / d),
            o / d <= 1.02,
        );
    }
    if n >= 10_000 {
        let metric = "all entries written";
        let (o, i, f) = (
            m("6-cold-sync", "ours", metric),
            m("6-cold-sync", "IPT", metric),
            m("6-cold-sync", "NFT", metric),
        );
        report.goal(
            "6-cold-sync",
            &format!("<= 2 s, >= 10x faster than IPT, >= 100x faster than NFT at {n} services"),
            format!("{o:.0} ms, {:.1}x IPT, {:.1}x NFT", i / o, f / o),
            o <= 2000.0 && i / o >= 10.0 && f / o >= 100.0,
        );
    }
}
