//! lb-bench: the benchmarks of `cargo xtask bench`, each against baselines measured in the
//! same run, in network namespaces it creates and removes (no route out), with bounded
//! counts and durations. Writes BENCHMARKS.md and a JSON file of every repetition.

use std::{fs, io::Write as _, path::PathBuf, process::ExitCode, time::Instant};

use clap::Parser;
use lb_tests::{
    bench::{Meta, Report},
    run,
};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(name = "lb-bench")]
struct Args {
    /// Fewer repetitions, scales and samples (under 5 minutes on 2 cores).
    #[arg(long)]
    quick: bool,
    /// The Markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// The raw numbers.
    #[arg(long, default_value = "benchmarks.json")]
    json: PathBuf,
    /// Git revision measured (for the report).
    #[arg(long, default_value = "unknown")]
    revision: String,
    /// Only these benchmarks (comma-separated numbers, e.g. `1,10`); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<u32>,
    /// Where criterion wrote the micro-benchmarks' results (`cargo bench -p lb-userspace`),
    /// to include them as benchmark 11.
    #[arg(long)]
    criterion: Option<PathBuf>,
}

/// Sizes of one run.
struct Plan {
    reps: usize,
    /// Services for the XDP program cost.
    xdp_scales: Vec<u64>,
    /// Services for the socket-level benchmarks.
    cluster_scales: Vec<u64>,
    /// Runs per BPF_PROG_TEST_RUN.
    test_runs: u32,
    /// Connections per connect() latency sample set.
    connects: u32,
    /// Seconds per connection-rate sample.
    crr_seconds: f64,
    /// Round trips per request/response sample set.
    round_trips: u32,
    /// Services loaded for the incremental updates.
    update_scale: u64,
    /// Repetitions of each single-object update.
    update_reps: usize,
    /// Repetitions of the 10% roll.
    roll_reps: usize,
    /// Packets per north-south forwarding run.
    flood_packets: u32,
    /// Seconds of each new-connection run through the node port (5b).
    connection_seconds: f64,
    /// Runs of each variant of 5b.
    connection_reps: usize,
}

impl Plan {
    fn of(quick: bool) -> Self {
        if quick {
            Self {
                reps: 5,
                xdp_scales: vec![1, 10_000, 100_000],
                cluster_scales: vec![1, 1_000],
                test_runs: 100_000,
                connects: 300,
                crr_seconds: 0.5,
                round_trips: 500,
                update_scale: 10_000,
                update_reps: 5,
                roll_reps: 2,
                flood_packets: 1_000_000,
                connection_seconds: 5.0,
                connection_reps: 2,
            }
        } else {
            Self {
                reps: 7,
                xdp_scales: vec![1, 1_000, 10_000, 100_000],
                cluster_scales: vec![1, 1_000, 10_000],
                test_runs: 1_000_000,
                connects: 2_000,
                crr_seconds: 1.5,
                round_trips: 3_000,
                update_scale: 10_000,
                update_reps: 20,
                roll_reps: 6,
                flood_packets: 4_000_000,
                connection_seconds: 60.0,
                connection_reps: 2,
            }
        }
    }
}

mod cluster;
mod fixture;
mod hookstats;
mod maglev;
mod map_updates;
mod memory;
mod north_south;
mod updates;
mod xdp_cost;

use cluster::cluster;
use maglev::maglev_bench;
use map_updates::map_updates;
use xdp_cost::xdp_cost;

const TITLES: [(&str, &str); 12] = [
    (
        "1-program-cost",
        "1. Program cost vs scale (ns per run: XDP by BPF_PROG_TEST_RUN, the connect hook by the kernel's bpf_stats)",
    ),
    (
        "2-connect",
        "2. connect() latency to a ClusterIP (µs, lower is better)",
    ),
    (
        "3-crr",
        "3. Short-connection rate (connections/s, higher is better)",
    ),
    (
        "4-rr",
        "4. Request/response latency over an established connection (µs, lower is better)",
    ),
    (
        "5-north-south",
        "5. North-south forwarding through a node port to a pod on another node (one UDP flow)",
    ),
    (
        "5b-new-connections",
        "5b. New TCP connections through a node port to a pod on another node (sustained; connections/s, higher is better)",
    ),
    (
        "8-map-updates",
        "8. Map update throughput (elements/s, higher is better)",
    ),
    (
        "6-cold-sync",
        "6. Cold sync: ms from agent start (ours), iptables-restore (IPT) or nft -f (NFT) until every entry is written",
    ),
    (
        "7-updates",
        "7. Incremental update latency through the Kubernetes source (ms, lower is better)",
    ),
    (
        "9-memory",
        "9. Memory: the agent's resident memory and its BPF maps' kernel memory",
    ),
    ("10-maglev", "10. Maglev"),
    (
        "11-micro",
        "11. Micro-benchmarks of the pure code (criterion, `cargo bench -p lb-userspace`; µs per call)",
    ),
];

fn main() -> ExitCode {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("lb-bench needs root: it creates network namespaces and loads BPF programs.");
        return ExitCode::FAILURE;
    }
    let plan = Plan::of(args.quick);
    let mut report = Report::new(meta(&args));
    let started = Instant::now();
    let wanted = |n: u32| args.only.is_empty() || args.only.contains(&n);
    if wanted(10) {
        maglev_bench(&mut report, &plan);
    }
    if wanted(1) {
        xdp_cost(&mut report, &plan);
    }
    if wanted(8) {
        map_updates(&mut report, &plan);
    }
    if [2, 3, 4, 6].into_iter().any(wanted) {
        for &n in &plan.cluster_scales {
            cluster(&mut report, &plan, n);
        }
    }
    if wanted(5) {
        north_south::north_south(&mut report, &plan);
        north_south::new_connections(&mut report, &plan);
    }
    if wanted(7) || wanted(6) {
        updates::update_latency(&mut report, &plan, plan.update_scale);
    }
    if wanted(9) {
        memory::memory(&mut report, plan.update_scale);
    }
    if let Some(dir) = &args.criterion {
        criterion_results(&mut report, dir);
    }
    report.notes.push(
        "What profiling showed about the missed goals, and the plan: docs/performance.md.".into(),
    );
    report.notes.push(format!(
        "1: the socket hooks are measured at the socket-level scales (up to 10k services, not \
         100k, whose manifest alone is 130 MB). Run took {:.0} s.",
        started.elapsed().as_secs_f64()
    ));
    let md = report.markdown(&TITLES);
    if let Err(e) = fs::write(&args.out, &md).and_then(|()| {
        fs::write(
            &args.json,
            serde_json::to_string_pretty(&report).expect("serializes"),
        )
    }) {
        eprintln!("lb-bench: writing the report: {e}");
        return ExitCode::FAILURE;
    }
    println!("{md}");
    println!(
        "written: {} and {}",
        args.out.display(),
        args.json.display()
    );
    ExitCode::SUCCESS
}

/// The medians criterion measured (each benchmark's `new/estimates.json`), as benchmark 11.
fn criterion_results(report: &mut Report, dir: &std::path::Path) {
    fn walk(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.ends_with("new") {
                out.push(path);
            } else if path.is_dir() {
                walk(&path, out);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, &mut found);
    found.sort();
    for new in found {
        let read = |file: &str| -> Option<Value> {
            serde_json::from_str(&fs::read_to_string(new.join(file)).ok()?).ok()
        };
        let (Some(id), Some(estimates)) = (read("benchmark.json"), read("estimates.json")) else {
            continue;
        };
        let (Some(name), Some(ns)) = (
            id["full_id"].as_str(),
            estimates["median"]["point_estimate"].as_f64(),
        ) else {
            continue;
        };
        report.add("11-micro", 1, "ours", name, "µs", vec![ns / 1e3]);
    }
}

fn meta(args: &Args) -> Meta {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Meta {
        kernel: run("uname", &["-r"]).unwrap_or_default().trim().to_owned(),
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        revision: args.revision.clone(),
        date: run("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
            .unwrap_or_default()
            .trim()
            .to_owned(),
        quick: args.quick,
    }
}

fn progress(what: &str) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("lb-bench [{t:6.1} s]: {what}");
    let _ = std::io::stderr().flush();
}
