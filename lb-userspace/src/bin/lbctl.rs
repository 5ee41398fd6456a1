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
    agent::health,
    cli,
    datapath::bpf::{
        MapSet, coarse_now_ns, lru_fill, read_flows, read_lru, read_socket_counters, read_stats,
    },
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
    /// Show the datapath counters, summed over CPUs; per frontend or per backend with a flag.
    Stats {
        /// Per frontend: new connections, refusals or drops, and (north-south) packets and
        /// bytes.
        #[arg(long, conflicts_with = "backends")]
        services: bool,
        /// Per backend: connections the socket hooks sent to it.
        #[arg(long)]
        backends: bool,
    },
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
    Capacity {
        /// Instead: each namespace's use of the maps against its share
        /// (`--namespace-share`), as the running agent counts it, fullest first.
        #[arg(long)]
        namespaces: bool,
        /// The agent's explain socket [default: the agent's of --pin-dir, under
        /// /run/lb-agent].
        #[arg(long)]
        agent: Option<String>,
    },
    /// Explain what the datapath does with traffic to DESTINATION (`address:port`): the
    /// frontend it is on each path, its backends and how one is picked, the XDP program's
    /// own answer for a packet from `--from` (run with BPF_PROG_TEST_RUN on the loaded
    /// program, in this network namespace), and, from the agent, why each endpoint of the
    /// service is or is not eligible. The run is a dry run: it records no flow and takes no
    /// SNAT port, though the counters count it (`--no-run` only reads the maps).
    Explain(ExplainArgs),
    /// List session affinity entries of both paths: frontend, client (network namespace on
    /// the socket path, address from outside), backend, idle time, time left, honoured.
    Affinity {
        /// Most entries to list.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// List tracked north-south flows: client, frontend, backend, SNAT address, state, age
    /// and time left.
    Conntrack {
        /// Most flows to list.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

#[derive(Debug, clap::Args)]
struct ExplainArgs {
    /// `address:port` (`[v6]:port` for IPv6).
    destination: std::net::SocketAddr,
    /// `tcp` or `udp`.
    #[arg(long, default_value = "tcp")]
    protocol: String,
    /// The client, `address:port` [default: 198.18.0.1:40000, or [2001:2::1]:40000].
    #[arg(long)]
    from: Option<std::net::SocketAddr>,
    /// The device whose XDP program runs the packet [default: the first one with it].
    #[arg(long)]
    device: Option<String>,
    /// Only read the maps: do not run the XDP program.
    #[arg(long)]
    no_run: bool,
    /// The agent's explain socket, asked for endpoint eligibility [default: the agent's of
    /// --pin-dir, under /run/lb-agent]; `off` to skip.
    #[arg(long)]
    agent: Option<String>,
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

fn run(args: Args) -> Result<(), LbctlError> {
    let layout = PinLayout::new(&args.pin_dir);
    let contents = || -> Result<_, LbctlError> {
        let maps = MapSet::open_pinned(&layout)?;
        Ok(maps.read()?)
    };
    match args.command {
        Command::Services => emit(args.output, &cli::services(&contents()?), |r| {
            cli::services_table(r)
        }),
        Command::Service { selector } => {
            let details = cli::service_detail(&contents()?, &selector);
            if details.is_empty() {
                return Err(LbctlError::NoMatch(format!(
                    "no frontend matches {selector:?}"
                )));
            }
            emit(args.output, &details, |d| cli::detail_text(d));
        }
        Command::Backends => emit(args.output, &cli::backends(&contents()?), |r| {
            cli::backends_table(r)
        }),
        Command::External => {
            let maps = MapSet::open_pinned(&layout)?;
            let c = maps.read()?;
            let ids: BTreeSet<u32> = c.external.values().map(|v| v.id).collect();
            let counters = ids
                .into_iter()
                .map(|id| maps.counters(id).map(|n| (id, n)))
                .collect::<Result<BTreeMap<_, _>, _>>()?;
            emit(args.output, &cli::external(&c, &counters), |r| {
                cli::external_table(r)
            });
        }
        Command::Maglev { selector } => {
            let selector = selector.unwrap_or_default();
            let summaries = cli::maglev(&contents()?, &selector);
            if summaries.is_empty() && !selector.is_empty() {
                return Err(LbctlError::NoMatch(format!(
                    "no north-south frontend matches {selector:?}"
                )));
            }
            emit(args.output, &summaries, |m| cli::maglev_text(m));
        }
        Command::Affinity { limit } => {
            let c = contents()?;
            let entries = read_lru(&layout, lb_common::maps::AFFINITY, limit)?;
            let mut rows = cli::affinity(&c, &entries, coarse_now_ns());
            let external = read_lru(&layout, lb_common::maps::EXTERNAL_AFFINITY, limit)?;
            // The agent's programs run with no clock offset.
            let now = lb_userspace::datapath::conntrack::clock_now(0);
            rows.extend(cli::external_affinity(&c, &external, now));
            cli::sort_affinity(&mut rows);
            emit(args.output, &rows, |r| cli::affinity_table(r));
        }
        Command::Conntrack { limit } => {
            let entries = read_flows(&layout, limit)?;
            // The agent's programs run with no clock offset.
            let now = lb_userspace::datapath::conntrack::clock_now(0);
            emit(args.output, &cli::flows(&contents()?, &entries, now), |r| {
                cli::flows_table(r)
            });
        }
        Command::Capacity {
            namespaces: true,
            agent,
        } => {
            let socket =
                health::explain_socket(layout.root(), agent.as_deref().map(std::path::Path::new));
            let rows: Vec<lb_userspace::model::share::Row> =
                match health::get_unix(&socket, "/shares", std::time::Duration::from_secs(5)) {
                    Ok((200, body)) => {
                        serde_json::from_str(&body).map_err(|e| LbctlError::Agent {
                            socket: socket.clone(),
                            reason: format!("its answer did not parse: {e}"),
                        })?
                    }
                    Ok((status, body)) => {
                        return Err(LbctlError::Agent {
                            socket,
                            reason: format!("answered {status}: {}", body.trim()),
                        });
                    }
                    Err(e) => {
                        return Err(LbctlError::Agent {
                            socket,
                            reason: e.to_string(),
                        });
                    }
                };
            emit(args.output, &rows, |r| cli::shares_table(r));
        }
        Command::Capacity { .. } => {
            let (maps, caps) = MapSet::open_pinned_with_capacities(&layout)?;
            let c = maps.read()?;
            let lru = lru_fill(&layout)?;
            emit(args.output, &cli::capacity(&c, &caps, &lru), |r| {
                cli::capacity_table(r)
            });
        }
        Command::Explain(a) => {
            let e = explain(&layout, &contents()?, a)?;
            emit(args.output, &e, cli::explain_text);
        }
        Command::Stats { services: true, .. } => {
            let maps = MapSet::open_pinned(&layout)?;
            let c = maps.read()?;
            let ids: Vec<u32> = c.services.values().map(|v| v.id).collect();
            let (socket, _) = read_socket_counters(&layout, &ids, &[])?;
            let external_ids: BTreeSet<u32> = c.external.values().map(|v| v.id).collect();
            let external = external_ids
                .into_iter()
                .map(|id| maps.counters(id).map(|n| (id, n)))
                .collect::<Result<BTreeMap<_, _>, _>>()?;
            emit(
                args.output,
                &cli::service_stats(&c, &socket, &external),
                |r| cli::service_stats_table(r),
            );
        }
        Command::Stats { backends: true, .. } => {
            let c = contents()?;
            let ids: Vec<u32> = c.backends.keys().copied().collect();
            let (_, counts) = read_socket_counters(&layout, &[], &ids)?;
            emit(args.output, &cli::backend_stats(&c, &counts), |r| {
                cli::backend_stats_table(r)
            });
        }
        Command::Stats { .. } => {
            let totals = read_stats(&layout)?;
            emit(args.output, &cli::stats(&totals), cli::stats_table);
        }
    }
    Ok(())
}

/// `lbctl explain`: the maps' view, the XDP program's answer and the agent's endpoint
/// verdicts.
fn explain(
    layout: &PinLayout,
    c: &lb_userspace::datapath::Contents,
    args: ExplainArgs,
) -> Result<cli::Explanation, LbctlError> {
    let ExplainArgs {
        destination,
        protocol,
        from,
        device,
        no_run,
        agent,
    } = args;
    use lb_common::{ServiceKey, proto};
    use lb_userspace::{addr::to_addr6, agent::netdev, cli::packet, loader};
    let proto = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => proto::TCP,
        "udp" => proto::UDP,
        other => return Err(LbctlError::Usage(format!("--protocol {other}: tcp or udp"))),
    };
    let source = from.unwrap_or_else(|| {
        if destination.is_ipv6() {
            "[2001:2::1]:40000".parse().expect("valid")
        } else {
            "198.18.0.1:40000".parse().expect("valid")
        }
    });
    if source.is_ipv6() != destination.is_ipv6() {
        return Err(LbctlError::Usage(
            "--from and the destination must be of one family".into(),
        ));
    }
    let key = ServiceKey::new(
        to_addr6(destination.ip().to_canonical()),
        destination.port().to_be(),
        proto,
    );
    let mut e = cli::explain(c, &key, source);
    if e.socket.is_none() && e.north_south.is_none() {
        return Err(LbctlError::NoMatch(format!(
            "{} is not a frontend on this node (see lbctl services and lbctl external)",
            e.destination
        )));
    }
    if let Some(ns) = e.north_south.as_mut().filter(|_| !no_run) {
        let devices = loader::attached_devices(layout, loader::DeviceKind::Xdp)?;
        let device = device.or_else(|| devices.first().cloned()).ok_or_else(|| {
            LbctlError::NoMatch(
                "no device runs the XDP program (see --xdp-devices); --no-run reads the \
                     maps only"
                    .into(),
            )
        })?;
        let ifindex = netdev::ifindex(&device).ok_or_else(|| {
            LbctlError::NoMatch(format!("no device {device} in this network namespace"))
        })?;
        let frame = packet::frame(proto, source, destination, b"lbctl explain");
        let out = loader::run_attached_xdp(layout, &device, ifindex, &frame)?;
        ns.datapath = Some(cli::xdp_run(&device, out.verdict, &frame, &out.frame));
    }
    let service = e
        .socket
        .as_ref()
        .map(|s| s.service.clone())
        .or_else(|| e.north_south.as_ref().map(|n| n.service.clone()))
        .unwrap_or_default();
    if agent.as_deref() == Some("off") {
        e.endpoints_unavailable = Some("not asked (--agent off)".into());
    } else {
        let socket =
            health::explain_socket(layout.root(), agent.as_deref().map(std::path::Path::new));
        let path = format!("/explain/{service}");
        match health::get_unix(&socket, &path, std::time::Duration::from_secs(5)) {
            Ok((200, body)) => {
                // Only the service port (and family) asked about.
                let port_name = e
                    .socket
                    .as_ref()
                    .map(|s| s.port_name.clone())
                    .or_else(|| e.north_south.as_ref().map(|n| n.port_name.clone()))
                    .unwrap_or_default();
                let family = if destination.is_ipv6() {
                    "IPv6"
                } else {
                    "IPv4"
                };
                match serde_json::from_str::<lb_userspace::model::ServiceExplanation>(&body) {
                    Ok(mut explained) => {
                        explained.ports.retain(|p| {
                            p.port_name == port_name
                                && p.protocol.eq_ignore_ascii_case(&protocol)
                                && p.family == family
                        });
                        e.endpoints = Some(explained);
                    }
                    Err(err) => {
                        e.endpoints_unavailable =
                            Some(format!("the agent's answer did not parse: {err}"));
                    }
                }
            }
            Ok((status, body)) => {
                e.endpoints_unavailable = Some(format!(
                    "the agent at {} answered {status}: {}",
                    socket.display(),
                    body.trim()
                ));
            }
            Err(err) => {
                e.endpoints_unavailable = Some(format!("the agent at {}: {err}", socket.display()));
            }
        }
    }
    Ok(e)
}

/// Why lbctl could not answer.
#[derive(Debug, thiserror::Error)]
enum LbctlError {
    /// The pinned maps or programs could not be opened or read.
    #[error(transparent)]
    Load(#[from] lb_userspace::loader::LoadError),
    /// A map read failed.
    #[error(transparent)]
    Datapath(#[from] lb_userspace::datapath::DatapathError),
    /// A counter map could not be read.
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    /// The agent's explain socket did not answer as it should.
    #[error("the agent at {socket}: {reason}")]
    Agent {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Nothing matches what was asked for.
    #[error("{0}")]
    NoMatch(String),
    /// An argument that cannot be used.
    #[error("{0}")]
    Usage(String),
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
