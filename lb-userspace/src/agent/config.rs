//! The agent's command line (each flag also has an environment variable) and logging.

use std::{io::IsTerminal as _, path::PathBuf};

use clap::{Parser, ValueEnum};
use ipnet::IpNet;
use lb_common::maps::{
    DEFAULT_MAGLEV_ENTRIES_PER_BACKEND, DEFAULT_MAGLEV_TABLE_SIZE, DEFAULT_MAX_AFFINITY,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_EXTERNAL, DEFAULT_MAX_FLOWS, DEFAULT_MAX_NEW_FLOWS,
    DEFAULT_MAX_REV_NAT, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SLOTS, DEFAULT_MAX_SOURCE_RANGES,
    DEFAULT_PIN_DIR, DEFAULT_TABLE_ENTRIES, MAX_BACKENDS_PER_SERVICE_LIMIT,
};

use crate::{datapath::catalogue::Knob, k8s::source::kubernetes, loader::MapSizes, model::Limits};

/// Default for `--max-backends-per-service`.
pub const DEFAULT_MAX_BACKENDS_PER_SERVICE: u32 = 4096;

/// A flag value the agent cannot use: which flag, the value given, and what is wrong with it
/// (what it should be).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {value}: {reason}")]
pub struct FlagError {
    /// The flag, e.g. `--snat-ports`.
    pub flag: &'static str,
    /// The value as given.
    pub value: String,
    /// What is wrong, and what it should be.
    pub reason: String,
}

impl FlagError {
    pub(crate) fn new(flag: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Self {
            flag,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// How XDP attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum XdpModeArg {
    /// The kernel's choice: native when the driver supports it, else generic.
    Auto,
    /// In the driver.
    Native,
    /// In the generic stack path (slower; any device).
    Generic,
}

/// Which devices run a kind of north-south program (`--xdp-devices`, `--overlay-devices`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Devices {
    /// None.
    None,
    /// Found by the agent: for XDP, the interfaces holding the Node object's addresses (or a
    /// default route); for overlays, the VXLAN and Geneve devices.
    Auto,
    /// These interfaces.
    Named(Vec<String>),
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// lb-agent: programs the socket-level service load balancer and keeps it in sync.
#[derive(Debug, Parser)]
#[command(name = "lb-agent", version, about, long_about = None)]
pub struct AgentArgs {
    /// Where Services and EndpointSlices come from: `kubernetes` (the API server), or
    /// `file:DIR`, a directory of manifests that is watched for changes.
    #[arg(long, env = "LB_SOURCE", required_unless_present = "cleanup")]
    pub source: Option<String>,

    /// kubeconfig for the kubernetes source [default: in-cluster configuration, or
    /// KUBECONFIG].
    #[arg(long, env = "LB_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// The API server's own address (e.g. https://192.0.2.1:6443), so that the agent does
    /// not depend on translating the `kubernetes` service itself. Empty means unset.
    #[arg(long, env = "LB_API_SERVER")]
    pub api_server: Option<String>,

    /// This node's name (in a DaemonSet, from the downward API's spec.nodeName). Needed for
    /// internalTrafficPolicy: Local and for topology hints.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// cgroup v2 directory whose processes get service translation [default: the root of the
    /// cgroup2 mount, i.e. every process on the node].
    #[arg(long, env = "LB_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// Mount point of the BPF filesystem; mounted there when it is not.
    #[arg(long, env = "LB_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// Directory on the BPF filesystem for the agent's pinned maps and links.
    #[arg(long, env = "LB_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// Capacity of the service map (frontends: cluster IP x port x protocol).
    #[arg(long, env = "LB_MAX_SERVICES", default_value_t = DEFAULT_MAX_SERVICES)]
    pub max_services: u32,

    /// Capacity of the slot map (the sum of all frontends' backend counts).
    #[arg(long, env = "LB_MAX_SLOTS", default_value_t = DEFAULT_MAX_SLOTS)]
    pub max_slots: u32,

    /// Capacity of the backend map (distinct backend address and port pairs).
    #[arg(long, env = "LB_MAX_BACKENDS", default_value_t = DEFAULT_MAX_BACKENDS)]
    pub max_backends: u32,

    /// Capacity of the reverse-NAT map (translated sockets remembered for replies).
    #[arg(long, env = "LB_MAX_REV_NAT", default_value_t = DEFAULT_MAX_REV_NAT)]
    pub max_rev_nat: u32,

    /// Capacity of the session affinity map (clients remembered across services).
    #[arg(long, env = "LB_MAX_AFFINITY", default_value_t = DEFAULT_MAX_AFFINITY)]
    pub max_affinity: u32,

    /// Most backends one frontend may have; a service over it is served by a stable subset
    /// of its endpoints of this size (ready ones first), with a Warning Event.
    #[arg(long, env = "LB_MAX_BACKENDS_PER_SERVICE", default_value_t = DEFAULT_MAX_BACKENDS_PER_SERVICE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BACKENDS_PER_SERVICE_LIMIT)))]
    pub max_backends_per_service: u32,

    /// Most frontends one service may have (cluster IPs, node ports on each node address,
    /// load-balancer and external IPs, times every port, both paths together); a service
    /// over it is rejected, so that no tenant's service fills the shared maps.
    #[arg(long, env = "LB_MAX_FRONTENDS_PER_SERVICE", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_frontends_per_service: u32,

    /// Most of each map (service, slot, backend, table... entries) one namespace's services
    /// may take, in percent of its capacity: a change that would take a namespace over it is
    /// refused for that service alone (it keeps what it had, and gets a Warning Event), so
    /// no tenant can fill a map for the others. 100 turns shares off.
    #[arg(long, env = "LB_NAMESPACE_SHARE", default_value_t = 50,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub namespace_share: u32,

    /// Directories of network namespaces pinned by the container runtime or CNI (bind
    /// mounts of `/proc/PID/ns/net`), comma-separated, where stale connected UDP sockets are
    /// looked for besides the namespaces of the processes the agent sees in /proc. With the
    /// runtime's directory mounted, the agent needs neither the host's PID namespace nor
    /// CAP_SYS_PTRACE.
    #[arg(long, env = "LB_NETNS_DIRS", default_value = "/run/netns")]
    pub netns_dirs: String,

    /// The node's `/proc/sys/net`, where the agent sets `accept_local` on the XDP and
    /// overlay devices: in an unprivileged container, whose own /proc/sys is read-only, the
    /// host's, mounted read-write.
    #[arg(long, env = "LB_PROC_SYS_NET", default_value = "/proc/sys/net")]
    pub proc_sys_net: PathBuf,

    /// Devices that run the XDP program for traffic from outside the node (node ports,
    /// load-balancer IPs, external IPs): a comma-separated list of interface names; `auto`
    /// for the interfaces holding the addresses of this node's Node object (or, without one,
    /// a default route); empty or `none` for no XDP.
    #[arg(long, env = "LB_XDP_DEVICES", default_value = "")]
    pub xdp_devices: String,

    /// Overlay devices (VXLAN, Geneve) through which backends on other nodes are reached:
    /// replies of SNATed north-south flows that arrive on them are reversed there (tc
    /// ingress). Comma-separated interface names; `auto` for every VXLAN and Geneve device,
    /// looked for again as they come and go; `none` for none. Only while XDP runs.
    #[arg(long, env = "LB_OVERLAY_DEVICES", default_value = "auto")]
    pub overlay_devices: String,

    /// How XDP attaches: `auto` (the driver's native mode when it has one), `native` or
    /// `generic`.
    #[arg(long, env = "LB_XDP_MODE", value_enum, default_value_t = XdpModeArg::Auto)]
    pub xdp_mode: XdpModeArg,

    /// Node addresses that serve node ports, as CIDRs (comma-separated), like kube-proxy's
    /// --nodeport-addresses: every local address inside them. Empty: every global address of
    /// the node.
    #[arg(long, env = "LB_NODEPORT_ADDRESSES", default_value = "")]
    pub nodeport_addresses: String,

    /// External IPs honoured, as CIDRs (comma-separated): a service's `externalIPs` outside
    /// them are not programmed (a Warning Event says so). Empty: any, as kube-proxy does;
    /// the addresses of this node are never honoured. The cluster-wide control is the API
    /// server's DenyServiceExternalIPs admission plugin.
    #[arg(long, env = "LB_EXTERNAL_IP_CIDRS", default_value = "")]
    pub external_ip_cidrs: String,

    /// Source ports for flows the XDP program SNATs to the node's address (a range outside
    /// the node's net.ipv4.ip_local_port_range).
    #[arg(long, env = "LB_SNAT_PORTS", default_value = "61000-65535")]
    pub snat_ports: String,

    /// Lifetime of a north-south TCP flow after its SYN until the client acknowledges the
    /// backend's answer: seconds, or a duration such as `1m` or `1m0s`.
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_SYN", default_value = "60s", value_parser = parse_secs)]
    pub conntrack_tcp_timeout_syn: u32,

    /// Idle lifetime of an established north-south TCP flow (kube-proxy's flag of the same
    /// name sets the kernel's to 24h).
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_ESTABLISHED", default_value = "24h", value_parser = parse_secs)]
    pub conntrack_tcp_timeout_established: u32,

    /// Idle lifetime of a half-closed north-south TCP flow (a FIN one way; kube-proxy's flag
    /// of the same name).
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_CLOSE_WAIT", default_value = "1h", value_parser = parse_secs)]
    pub conntrack_tcp_timeout_close_wait: u32,

    /// Lifetime of a closed north-south TCP flow (a FIN both ways, or a RST), for its last
    /// packets. Its SNAT port can be taken by a new flow at once.
    #[arg(long, env = "LB_CONNTRACK_TCP_TIMEOUT_CLOSE", default_value = "10s", value_parser = parse_secs)]
    pub conntrack_tcp_timeout_close: u32,

    /// Idle lifetime of a north-south UDP flow the backend has not answered (kube-proxy's
    /// --conntrack-udp-timeout; Linux's default).
    #[arg(long, env = "LB_CONNTRACK_UDP_TIMEOUT", default_value = "30s", value_parser = parse_secs)]
    pub conntrack_udp_timeout: u32,

    /// Idle lifetime of a north-south UDP flow with traffic both ways (kube-proxy's
    /// --conntrack-udp-timeout-stream; Linux's default).
    #[arg(long, env = "LB_CONNTRACK_UDP_TIMEOUT_STREAM", default_value = "120s", value_parser = parse_secs)]
    pub conntrack_udp_timeout_stream: u32,

    /// Longest interval between sweeps of expired north-south flows; sweeps come sooner (down
    /// to 1s) while they find many.
    #[arg(long, env = "LB_CONNTRACK_GC_INTERVAL", default_value = "30s", value_parser = parse_secs)]
    pub conntrack_gc_interval: u32,

    /// Largest Maglev lookup table of a north-south service: a prime, at least
    /// --max-backends-per-service. Each service's table is sized from its backend count (see
    /// --maglev-entries-per-backend), up to this.
    #[arg(long, env = "LB_MAGLEV_TABLE_SIZE", default_value_t = DEFAULT_MAGLEV_TABLE_SIZE)]
    pub maglev_table_size: u32,

    /// Maglev table entries per backend: a service gets the smallest table size (251, 509,
    /// 1021, 2039, ... about doubling) with this many entries per backend. More entries move
    /// fewer flows between the remaining backends when one changes, and cost memory.
    #[arg(long, env = "LB_MAGLEV_ENTRIES_PER_BACKEND", default_value_t = DEFAULT_MAGLEV_ENTRIES_PER_BACKEND,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub maglev_entries_per_backend: u32,

    /// Capacity of the Maglev table array, in entries (4 bytes each) over all north-south
    /// services: at least --maglev-table-size.
    #[arg(long, env = "LB_MAGLEV_TABLE_ENTRIES", default_value_t = DEFAULT_TABLE_ENTRIES)]
    pub maglev_table_entries: u32,

    /// Most north-south services (service ports and address families with a node port,
    /// load-balancer IP or external IP).
    #[arg(long, env = "LB_MAX_EXTERNAL_SERVICES", default_value_t = DEFAULT_MAX_EXTERNAL)]
    pub max_external_services: u32,

    /// Capacity of the north-south frontend map (node address x node port, load-balancer
    /// and external IPs x port).
    #[arg(long, env = "LB_MAX_EXTERNAL_FRONTENDS", default_value_t = DEFAULT_MAX_SERVICES)]
    pub max_external_frontends: u32,

    /// Capacity of the conntrack map of answered north-south flows (and of their reverse
    /// entries); the least recently used are evicted.
    #[arg(long, env = "LB_MAX_FLOWS", default_value_t = DEFAULT_MAX_FLOWS)]
    pub max_flows: u32,

    /// Capacity of the conntrack map of new north-south flows, not yet answered (TCP
    /// handshakes, one-way UDP), and of their reverse entries: a flood of spoofed SYNs
    /// turns this map over, not the answered flows'.
    #[arg(long, env = "LB_MAX_NEW_FLOWS", default_value_t = DEFAULT_MAX_NEW_FLOWS)]
    pub max_new_flows: u32,

    /// Capacity of the loadBalancerSourceRanges map (ranges over all services).
    #[arg(long, env = "LB_MAX_SOURCE_RANGES", default_value_t = DEFAULT_MAX_SOURCE_RANGES)]
    pub max_source_ranges: u32,

    /// Address of the health endpoint (`/livez`, `/healthz`, `/readyz`: the DaemonSet's
    /// probes and load balancers), as kube-proxy's; `off` disables it. It tells nothing of
    /// the services.
    #[arg(
        long,
        alias = "health-addr",
        env = "LB_HEALTHZ_BIND_ADDRESS",
        default_value = "0.0.0.0:10256"
    )]
    pub healthz_bind_address: String,

    /// Address of the metrics endpoint (`/metrics` for Prometheus, and the health paths), as
    /// kube-proxy's: on loopback by default, since the metrics name every service and
    /// backend; `off` disables it.
    #[arg(
        long,
        env = "LB_METRICS_BIND_ADDRESS",
        default_value = "127.0.0.1:10249"
    )]
    pub metrics_bind_address: String,

    /// Unix socket of the explain endpoint (`lbctl explain` asks it), created `0600` in a
    /// `0700` directory: only root reaches it. Default: `/run/lb-agent/<pin dir name>.sock`.
    #[arg(long, env = "LB_EXPLAIN_SOCKET")]
    pub explain_socket: Option<std::path::PathBuf>,

    /// Seconds after which programming counts as stale: `/livez` and `/healthz` fail when an
    /// update has waited this long to reach the maps, and `/readyz` fails when the source
    /// (the API server) has been unreachable this long.
    #[arg(long, env = "LB_STALE_AFTER", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stale_after: u64,

    /// Detach every program, remove every pinned map and link, and exit.
    #[arg(long)]
    pub cleanup: bool,

    /// Log every decision of the kernel programs (each translated or refused connection, each
    /// new or dropped north-south flow), sent through a ring buffer. For debugging only; off,
    /// the logging code is removed from the programs when they are verified.
    #[arg(long, env = "LB_KERNEL_DEBUG")]
    pub kernel_debug: bool,

    /// Log format. The level comes from RUST_LOG (default: info).
    #[arg(long, env = "LB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

impl AgentArgs {
    /// Checks what clap cannot; the error says what to change.
    pub fn validate(&self) -> Result<(), FlagError> {
        if !self.pin_dir.starts_with(&self.bpffs) || self.pin_dir == self.bpffs {
            return Err(FlagError::new(
                "--pin-dir",
                self.pin_dir.display(),
                format!(
                    "must be a directory inside the BPF filesystem --bpffs {}",
                    self.bpffs.display()
                ),
            ));
        }
        let sizes = self.map_sizes();
        for knob in Knob::ALL {
            if knob.value(&sizes) == 0 {
                return Err(FlagError::new(knob.flag(), 0, "must be at least 1"));
            }
        }
        crate::model::maglev::check_table_size(self.maglev_table_size).map_err(|e| {
            FlagError::new("--maglev-table-size", self.maglev_table_size, e.to_string())
        })?;
        if self.maglev_table_size < self.max_backends_per_service {
            return Err(FlagError::new(
                "--maglev-table-size",
                self.maglev_table_size,
                format!(
                    "must be at least --max-backends-per-service {}",
                    self.max_backends_per_service
                ),
            ));
        }
        self.table_entries()?;
        self.healthz()?;
        self.metrics()?;
        self.snat_range()?;
        self.nodeport_cidrs()?;
        self.external_ip_cidrs()?;
        self.xdp_devices()?;
        self.overlay_devices()?;
        Ok(())
    }

    /// Entries of the lookup table array, checked.
    pub fn table_entries(&self) -> Result<u32, FlagError> {
        let n = self.maglev_table_entries;
        if n < self.maglev_table_size || n > 1 << 28 {
            return Err(FlagError::new(
                "--maglev-table-entries",
                n,
                format!(
                    "must be between --maglev-table-size {} and 2^28",
                    self.maglev_table_size
                ),
            ));
        }
        Ok(n)
    }

    /// The SNAT port range, inclusive.
    pub fn snat_range(&self) -> Result<(u16, u16), FlagError> {
        let bad = || {
            FlagError::new(
                "--snat-ports",
                &self.snat_ports,
                "expected FIRST-LAST, e.g. 61000-65535",
            )
        };
        let (a, b) = self.snat_ports.split_once('-').ok_or_else(bad)?;
        let (a, b): (u16, u16) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if a == 0 || a > b || b - a < 255 {
            return Err(FlagError::new(
                "--snat-ports",
                &self.snat_ports,
                "the range must be non-empty, above 0 and hold at least 256 ports",
            ));
        }
        Ok((a, b))
    }

    /// The lifetimes of the north-south flow states.
    pub fn ct_timeouts(&self) -> lb_common::external::CtTimeouts {
        lb_common::external::CtTimeouts {
            secs: [
                self.conntrack_tcp_timeout_syn,
                self.conntrack_tcp_timeout_established,
                self.conntrack_tcp_timeout_close_wait,
                self.conntrack_tcp_timeout_close,
                self.conntrack_udp_timeout,
                self.conntrack_udp_timeout_stream,
            ],
        }
    }

    /// The CIDRs of --nodeport-addresses (empty: every address).
    pub fn nodeport_cidrs(&self) -> Result<Vec<IpNet>, FlagError> {
        cidr_list("--nodeport-addresses", &self.nodeport_addresses)
    }

    /// The CIDRs of --external-ip-cidrs (empty: any).
    pub fn external_ip_cidrs(&self) -> Result<Vec<IpNet>, FlagError> {
        cidr_list("--external-ip-cidrs", &self.external_ip_cidrs)
    }

    /// The XDP devices asked for.
    pub fn xdp_devices(&self) -> Result<Devices, FlagError> {
        device_list("--xdp-devices", &self.xdp_devices)
    }

    /// The overlay devices asked for.
    pub fn overlay_devices(&self) -> Result<Devices, FlagError> {
        device_list("--overlay-devices", &self.overlay_devices)
    }

    /// The health endpoint's address, `None` when disabled.
    pub fn healthz(&self) -> Result<Option<std::net::SocketAddr>, FlagError> {
        bind_address("--healthz-bind-address", &self.healthz_bind_address)
    }

    /// The metrics endpoint's address, `None` when disabled.
    pub fn metrics(&self) -> Result<Option<std::net::SocketAddr>, FlagError> {
        bind_address("--metrics-bind-address", &self.metrics_bind_address)
    }

    /// Map capacities to create maps with.
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            services: self.max_services,
            slots: self.max_slots,
            backends: self.max_backends,
            rev_nat: self.max_rev_nat,
            affinity: self.max_affinity,
            external: self.max_external_frontends,
            external_ids: self.max_external_services,
            table_entries: self
                .table_entries()
                .unwrap_or(lb_common::maps::DEFAULT_TABLE_ENTRIES),
            flows: self.max_flows,
            new_flows: self.max_new_flows,
            source_ranges: self.max_source_ranges,
        }
    }

    /// Settings of the kubernetes source.
    pub fn api(&self) -> kubernetes::Settings {
        kubernetes::Settings {
            kubeconfig: self.kubeconfig.clone(),
            // Empty (an unset ConfigMap key) means: not given.
            api_server: self.api_server.clone().filter(|s| !s.is_empty()),
            node_name: self.node_name.clone(),
            // Half the time after which an outage makes the agent unready: a hung server
            // is noticed well within it.
            probe_every: std::time::Duration::from_millis(self.stale_after * 500).clamp(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(10),
            ),
        }
    }

    /// The directories of pinned network namespaces ([`Self::netns_dirs`]).
    pub fn netns_dirs(&self) -> Vec<PathBuf> {
        split_list(&self.netns_dirs).map(PathBuf::from).collect()
    }

    /// Per-service limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_backends_per_service: self.max_backends_per_service as usize,
            max_frontends_per_service: self.max_frontends_per_service as usize,
            max_table_size: self.maglev_table_size,
            entries_per_backend: self.maglev_entries_per_backend,
        }
    }
}

/// The non-empty items of a comma-separated list, trimmed.
fn split_list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty())
}

/// Sets up tracing: RUST_LOG filters (default `info`), human or JSON lines on stderr.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal (and never with NO_COLOR set), not in collected logs.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// A duration flag in whole seconds: a number of seconds, or a duration such as `90s`,
/// `1h30m` or kube-proxy's `24h0m0s`. At most 10 years.
fn parse_secs(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let secs = if let Ok(n) = s.parse::<u64>() {
        n
    } else {
        let d: jiff::SignedDuration = s
            .parse()
            .map_err(|e| format!("{s:?}: expected seconds or a duration like 90s or 1h: {e}"))?;
        u64::try_from(d.as_secs()).map_err(|_| format!("{s:?}: a duration cannot be negative"))?
    };
    if secs > 10 * 365 * 86_400 {
        return Err(format!("{s:?}: at most 10 years"));
    }
    Ok(secs as u32)
}

/// A bind address flag's value: an address, or `off`.
fn bind_address(
    flag: &'static str,
    value: &str,
) -> Result<Option<std::net::SocketAddr>, FlagError> {
    if value == "off" {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .map_err(|e: std::net::AddrParseError| FlagError::new(flag, value, e.to_string()))
}

/// A CIDR list flag's value, each truncated to its network.
fn cidr_list(flag: &'static str, value: &str) -> Result<Vec<IpNet>, FlagError> {
    split_list(value)
        .map(|c| {
            c.parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|e| FlagError::new(flag, format!("{c:?}"), e.to_string()))
        })
        .collect()
}

/// A device list flag's value: names, `auto`, or empty or `none`.
fn device_list(flag: &'static str, value: &str) -> Result<Devices, FlagError> {
    let names: Vec<&str> = split_list(value).collect();
    match names.as_slice() {
        [] | ["none"] => Ok(Devices::None),
        ["auto"] => Ok(Devices::Auto),
        names => {
            for n in names {
                if *n == "auto" || *n == "none" || n.len() > 15 || n.contains('/') {
                    return Err(FlagError::new(
                        flag,
                        format!("{n:?}"),
                        "is not an interface name",
                    ));
                }
            }
            Ok(Devices::Named(
                names.iter().map(std::string::ToString::to_string).collect(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capacity_flag_of_the_catalogue_is_a_flag_and_is_checked() {
        use clap::CommandFactory as _;
        let cmd = AgentArgs::command();
        for knob in Knob::ALL {
            let long = knob.flag().trim_start_matches("--");
            assert!(
                cmd.get_arguments().any(|a| a.get_long() == Some(long)),
                "{} is a flag of the agent",
                knob.flag()
            );
        }
        let err = parse(&["--source", "file:/x", "--max-new-flows", "0"]).unwrap_err();
        assert_eq!(err, "--max-new-flows 0: must be at least 1");
    }

    fn parse(args: &[&str]) -> Result<AgentArgs, String> {
        let a = AgentArgs::try_parse_from(["lb-agent"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        a.validate().map_err(|e| e.to_string())?;
        Ok(a)
    }

    #[test]
    fn defaults() {
        let a = parse(&["--source", "file:/m"]).unwrap();
        assert_eq!(a.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(a.max_backends_per_service, DEFAULT_MAX_BACKENDS_PER_SERVICE);
        assert_eq!(a.log_format, LogFormat::Human);
    }

    #[test]
    fn an_empty_api_server_is_unset() {
        let a = parse(&["--source", "kubernetes", "--api-server", ""]).unwrap();
        assert_eq!(a.api().api_server, None);
        let a = parse(&[
            "--source",
            "kubernetes",
            "--api-server",
            "https://192.0.2.1:6443",
        ])
        .unwrap();
        assert_eq!(
            a.api().api_server.as_deref(),
            Some("https://192.0.2.1:6443")
        );
    }

    #[test]
    fn rejects_bad_values() {
        assert!(parse(&[]).is_err(), "a source is required");
        assert!(parse(&["--cleanup"]).is_ok(), "but not for --cleanup");
        assert!(parse(&["--source", "file:/m", "--pin-dir", "/tmp/x"]).is_err());
        assert!(parse(&["--source", "file:/m", "--max-slots", "0"]).is_err());
        assert!(parse(&["--source", "file:/m", "--max-backends-per-service", "70000"]).is_err());
        for bad in [
            &["--maglev-table-size", "16384"][..],
            &["--maglev-table-size", "251"],
            &["--snat-ports", "70000-80000"],
            &["--snat-ports", "65000-64000"],
            &["--snat-ports", "65000"],
            &["--nodeport-addresses", "10.0.0.0/33"],
            &["--xdp-devices", "eth0,auto"],
            &["--max-flows", "0"],
            &[
                "--maglev-table-size",
                "65521",
                "--maglev-table-entries",
                "65000",
            ],
            &["--maglev-entries-per-backend", "0"],
        ] {
            let mut args = vec!["--source", "file:/m"];
            args.extend_from_slice(bad);
            assert!(parse(&args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn north_south_settings() {
        let a = parse(&["--source", "file:/m"]).unwrap();
        assert_eq!(a.xdp_devices(), Ok(Devices::None));
        assert_eq!(a.snat_range(), Ok((61000, 65535)));
        assert_eq!(a.nodeport_cidrs(), Ok(vec![]));
        assert_eq!(a.limits().max_table_size, DEFAULT_MAGLEV_TABLE_SIZE);
        let a = parse(&[
            "--source",
            "file:/m",
            "--xdp-devices",
            "eth0, eth1",
            "--nodeport-addresses",
            "10.0.0.0/8,2001:db8::1/64",
            "--maglev-table-size",
            "65537",
        ])
        .unwrap();
        assert_eq!(
            a.xdp_devices(),
            Ok(Devices::Named(vec!["eth0".into(), "eth1".into()]))
        );
        assert_eq!(
            a.nodeport_cidrs().unwrap(),
            [
                "10.0.0.0/8".parse::<IpNet>().unwrap(),
                "2001:db8::/64".parse().unwrap()
            ]
        );
        assert_eq!(a.table_entries(), Ok(DEFAULT_TABLE_ENTRIES));
        assert_eq!(a.limits().table_size(10), 1021);
        assert_eq!(a.limits().table_size(1000), 65537);
        assert_eq!(
            parse(&["--source", "file:/m", "--xdp-devices", "auto"])
                .unwrap()
                .xdp_devices(),
            Ok(Devices::Auto)
        );
        assert_eq!(a.overlay_devices(), Ok(Devices::Auto));
        let a = parse(&["--source", "file:/m", "--overlay-devices", "flannel.1"]).unwrap();
        assert_eq!(
            a.overlay_devices(),
            Ok(Devices::Named(vec!["flannel.1".into()]))
        );
        assert!(parse(&["--source", "file:/m", "--overlay-devices", "a/b"]).is_err());
    }

    #[test]
    fn conntrack_timeouts_take_seconds_or_durations() {
        assert_eq!(parse_secs("30"), Ok(30));
        assert_eq!(parse_secs("90s"), Ok(90));
        assert_eq!(parse_secs("24h0m0s"), Ok(86_400));
        assert_eq!(parse_secs("1h30m"), Ok(5_400));
        assert!(parse_secs("-5s").is_err());
        assert!(parse_secs("soon").is_err());
        assert!(parse_secs("100y").is_err());
    }
}
