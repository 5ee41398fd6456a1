//! lbctl: shows what the datapath holds, reading the pinned maps read-only. It works while
//! the agent is down and never writes.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use lb_common::maps::DEFAULT_PIN_DIR;
use lb_userspace::{
    datapath::bpf::{MapSet, lru_fill, read_conntrack, read_stats},
    inspect,
    loader::PinLayout,
};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// lbctl: inspect the load balancer's pinned maps.
#[derive(Debug, Parser)]
#[command(name = "lbctl", version, about, long_about = None)]
struct Args {
    /// The agent's pin directory.
    #[arg(long, env = "LB_PIN_DIR", default_value = DEFAULT_PIN_DIR, global = true)]
    pin_dir: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List service frontends: VIP:port/protocol, backend count, Kubernetes service.
    Services,
    /// Show frontends with their slots, by `namespace/name`, `VIP:port` or `VIP:port/PROTO`.
    Service {
        /// Which service or frontend.
        selector: String,
    },
    /// List backends.
    Backends,
    /// Show the datapath counters, summed over CPUs.
    Stats,
    /// List north-south frontends (node ports, load-balancer IPs, external IPs) with their
    /// policy, backends and per-service packet, byte, flow and drop counters.
    External,
    /// Summarise Maglev lookup tables: each backend's share of new flows, for the services
    /// a selector picks (`namespace/name`, `IP:port`, `IP:port/PROTO`; default all).
    Maglev {
        /// Which service or frontend.
        selector: Option<String>,
    },
    /// How full each map is, against its capacity and the agent flag that sets it.
    Capacity,
    /// List tracked north-south flows: client, frontend, backend and SNAT address.
    Conntrack {
        /// Most flows to list.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

fn emit<T: Serialize>(output: Output, value: &T, table: impl FnOnce(&T) -> String) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("views serialize")
        ),
        Output::Table => print!("{}", table(value)),
    }
}

fn run(args: Args) -> Result<(), String> {
    let layout = PinLayout::new(&args.pin_dir);
    let contents = || -> Result<_, String> {
        let maps = MapSet::open_pinned(&layout).map_err(|e| e.to_string())?;
        maps.read().map_err(|e| e.to_string())
    };
    match args.command {
        Command::Services => emit(args.output, &inspect::services(&contents()?), |r| {
            inspect::services_table(r)
        }),
        Command::Service { selector } => {
            let details = inspect::service_detail(&contents()?, &selector);
            if details.is_empty() {
                return Err(format!("no frontend matches {selector:?}"));
            }
            emit(args.output, &details, |d| inspect::detail_text(d));
        }
        Command::Backends => emit(args.output, &inspect::backends(&contents()?), |r| {
            inspect::backends_table(r)
        }),
        Command::External => {
            let maps = MapSet::open_pinned(&layout).map_err(|e| e.to_string())?;
            let c = maps.read().map_err(|e| e.to_string())?;
            let ids: BTreeSet<u32> = c.external.values().map(|v| v.id).collect();
            let counters = ids
                .into_iter()
                .map(|id| maps.counters(id).map(|n| (id, n)))
                .collect::<Result<BTreeMap<_, _>, _>>()
                .map_err(|e| e.to_string())?;
            emit(args.output, &inspect::external(&c, &counters), |r| {
                inspect::external_table(r)
            });
        }
        Command::Maglev { selector } => {
            let selector = selector.unwrap_or_default();
            let summaries = inspect::maglev(&contents()?, &selector);
            if summaries.is_empty() && !selector.is_empty() {
                return Err(format!("no north-south frontend matches {selector:?}"));
            }
            emit(args.output, &summaries, |m| inspect::maglev_text(m));
        }
        Command::Conntrack { limit } => {
            let entries = read_conntrack(&layout, limit).map_err(|e| e.to_string())?;
            emit(args.output, &inspect::flows(&contents()?, &entries), |r| {
                inspect::flows_table(r)
            });
        }
        Command::Capacity => {
            let (maps, caps) =
                MapSet::open_pinned_with_capacities(&layout).map_err(|e| e.to_string())?;
            let c = maps.read().map_err(|e| e.to_string())?;
            let lru = lru_fill(&layout).map_err(|e| e.to_string())?;
            emit(args.output, &inspect::capacity(&c, &caps, &lru), |r| {
                inspect::capacity_table(r)
            });
        }
        Command::Stats => {
            let totals = read_stats(&layout).map_err(|e| e.to_string())?;
            emit(args.output, &inspect::stats(&totals), |s| {
                inspect::stats_table(s)
            });
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbctl: {e}");
            ExitCode::FAILURE
        }
    }
}
