//! Benchmark 9, memory at 10k services and 100k endpoints: the agent's resident memory
//! (steady, after the sync, and its peak) and the kernel memory of its BPF maps, per map
//! (each map's `memlock` in `/proc/<agent>/fdinfo`, which the kernel computes from the map's
//! real size). The services are LoadBalancer services, so each also has a north-south
//! frontend with a Maglev table sized from its 10 backends. The agent reads them from the
//! Kubernetes API (the fixture), as in production.

use std::{collections::BTreeMap, fs, net::Ipv4Addr, time::Duration};

use lb_tests::{apiserver::ApiServer, bench::Report, manifest::documents, run, world::World};
use serde_json::{Value, json};

use crate::{
    fixture::{objects, services, timed_start},
    progress,
};

const BENCH: &str = "9-memory";
const MIB: f64 = 1024.0 * 1024.0;
/// The LRU maps, allocated whole at their capacity (`--max-flows`, `--max-new-flows`,
/// `--max-rev-nat`, `--max-affinity`).
const FLOW_MAPS: [&str; 6] = [
    lb_common::maps::CONNTRACK,
    lb_common::maps::EXTERNAL_REV_NAT,
    lb_common::maps::CT_NEW,
    lb_common::maps::EXTERNAL_REV_NAT_NEW,
    lb_common::maps::REV_NAT,
    lb_common::maps::AFFINITY,
];

/// A field of `/proc/<pid>/status` in kB, as MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The maps `pid` holds open: name -> bytes of kernel memory.
fn map_bytes(pid: u32) -> BTreeMap<String, f64> {
    let mut by_id: BTreeMap<u64, f64> = BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("the agent's fdinfo") {
        let Ok(text) = fs::read_to_string(entry.expect("an fdinfo entry").path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
            by_id.insert(id, bytes as f64);
        }
    }
    by_id
        .into_iter()
        .map(|(id, bytes)| {
            let shown = run("bpftool", &["map", "show", "id", &id.to_string(), "-j"])
                .unwrap_or_else(|e| panic!("bpftool map show id {id}: {e}"));
            let v: Value = serde_json::from_str(&shown).expect("bpftool JSON");
            let name = v["name"].as_str().unwrap_or("?").to_owned();
            (name, bytes)
        })
        .collect()
}

/// The services of [`services`] as LoadBalancer services with one ingress IP each.
fn load_balancers(n: u64) -> Vec<Value> {
    let mut items = objects(&services(n));
    for (i, item) in items
        .iter_mut()
        .filter(|o| o["kind"] == "Service")
        .enumerate()
    {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i as u32);
        item["spec"]["type"] = json!("LoadBalancer");
        item["spec"]["allocateLoadBalancerNodePorts"] = json!(false);
        item["status"] = json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}});
    }
    items
}

/// Benchmark 9 at `n` services of 10 endpoints, and the maps of an idle agent at the
/// default capacities.
pub fn memory(report: &mut Report, n: u64) {
    progress("9: memory of an idle agent at the default capacities");
    let mut idle = World::new(0);
    timed_start(&mut idle, |w| w.start_agent(&[]));
    let pid = idle.agent_pid().expect("the agent runs");
    let maps: f64 = map_bytes(pid).values().sum::<f64>() / MIB;
    report.add(
        BENCH,
        0,
        "ours",
        "BPF maps at the default capacities, no services",
        "MiB",
        vec![maps],
    );
    report.add(
        BENCH,
        0,
        "ours",
        "agent heap, no services",
        "MiB",
        vec![status_mib(pid, "RssAnon")],
    );
    drop(idle);

    progress(&format!("9: memory at {n} services"));
    let mut w = World::new(0);
    let api = ApiServer::start();
    let docs: Vec<String> = load_balancers(n).iter().map(Value::to_string).collect();
    api.apply(&documents(&docs));
    // Capacities an operator would set for this cluster: the defaults, with room for the
    // backends, north-south services and tables.
    let backends = (n * 10 * 5 / 4).to_string();
    let external = (n * 5 / 4).to_string();
    let entries = (n * 1021 * 5 / 4).to_string();
    timed_start(&mut w, |w| {
        w.start_agent_kube(
            &api,
            &[
                "--max-backends",
                &backends,
                "--max-external-services",
                &external,
                "--maglev-table-entries",
                &entries,
                // One namespace holds every service (single-tenant): no shares.
                "--namespace-share",
                "100",
            ],
        );
    });
    assert!(
        !w.agent_log().contains("map full"),
        "a map was too small for the benchmark"
    );
    std::thread::sleep(Duration::from_secs(2));
    let pid = w.agent_pid().expect("the agent runs");
    let (steady, peak) = (status_mib(pid, "VmRSS"), status_mib(pid, "VmHWM"));
    let (anon, file) = (status_mib(pid, "RssAnon"), status_mib(pid, "RssFile"));
    let maps = map_bytes(pid);
    drop(w);

    report.add(BENCH, n, "ours", "agent RSS, steady", "MiB", vec![steady]);
    report.add(BENCH, n, "ours", "agent RSS, peak", "MiB", vec![peak]);
    report.add(
        BENCH,
        n,
        "ours",
        "agent RSS, steady: heap",
        "MiB",
        vec![anon],
    );
    report.add(
        BENCH,
        n,
        "ours",
        "agent RSS, steady: mapped files (code, and the table array, which is map memory)",
        "MiB",
        vec![file],
    );
    let total: f64 = maps.values().sum::<f64>() / MIB;
    report.add(BENCH, n, "ours", "BPF maps, all", "MiB", vec![total]);
    // The flow maps (LRU) are allocated whole at their capacity, whatever the services.
    let flows: f64 = FLOW_MAPS
        .iter()
        .filter_map(|name| maps.get(*name))
        .sum::<f64>()
        / MIB;
    let for_services = total - flows;
    report.add(
        BENCH,
        n,
        "ours",
        "BPF maps for the services (all but the fixed-size flow maps)",
        "MiB",
        vec![for_services],
    );
    let mut largest: Vec<(&String, &f64)> = maps.iter().collect();
    largest.sort_by(|a, b| b.1.total_cmp(a.1));
    for (name, bytes) in largest.iter().take(6) {
        report.add(
            BENCH,
            n,
            "ours",
            &format!("BPF map {name}"),
            "MiB",
            vec![**bytes / MIB],
        );
    }
    let fixed = n as f64 * f64::from(lb_common::maps::DEFAULT_MAGLEV_TABLE_SIZE) * 4.0 / MIB;
    report.goal(
        BENCH,
        &format!(
            "agent RSS <= 100 MiB steady and <= 150 MiB peak at {n} services / {} endpoints",
            n * 10
        ),
        format!(
            "{steady:.0} MiB steady ({anon:.0} MiB heap, {file:.0} MiB mapped files), \
             {peak:.0} MiB peak"
        ),
        steady <= 100.0 && peak <= 150.0,
    );
    report.goal(
        BENCH,
        &format!(
            "BPF maps for {n} small services not hundreds of MiB (< 200 MiB), Maglev tables \
             sized per service"
        ),
        format!(
            "{for_services:.0} MiB for the services ({total:.0} MiB with the flow maps); \
             tables of {} entries each would take {fixed:.0} MiB alone",
            lb_common::maps::DEFAULT_MAGLEV_TABLE_SIZE
        ),
        for_services < 200.0,
    );
}
