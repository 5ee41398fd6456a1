//! The agent's command line (each flag also has an environment variable) and logging.

use std::{io::IsTerminal as _, path::PathBuf};

use clap::{Parser, ValueEnum};
use lb_common::maps::{
    DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_REV_NAT, DEFAULT_MAX_SERVICES,
    DEFAULT_MAX_SLOTS, DEFAULT_PIN_DIR, MAX_BACKENDS_PER_SERVICE_LIMIT,
};

use crate::{loader::MapSizes, model::Limits, source::kubernetes};

/// Default for `--max-backends-per-service`.
pub const DEFAULT_MAX_BACKENDS_PER_SERVICE: u32 = 4096;

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

    /// Most backends one frontend may have; a service over it is rejected.
    #[arg(long, env = "LB_MAX_BACKENDS_PER_SERVICE", default_value_t = DEFAULT_MAX_BACKENDS_PER_SERVICE,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_BACKENDS_PER_SERVICE_LIMIT)))]
    pub max_backends_per_service: u32,

    /// Address of the health endpoint (`/healthz`, `/readyz`) for the DaemonSet's probes;
    /// `off` disables it.
    #[arg(long, env = "LB_HEALTH_ADDR", default_value = "0.0.0.0:9890")]
    pub health_addr: String,

    /// Detach every program, remove every pinned map and link, and exit.
    #[arg(long)]
    pub cleanup: bool,

    /// Log format. The level comes from RUST_LOG (default: info).
    #[arg(long, env = "LB_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

impl AgentArgs {
    /// Checks what clap cannot; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if !self.pin_dir.starts_with(&self.bpffs) || self.pin_dir == self.bpffs {
            return Err(format!(
                "--pin-dir {} must be a directory inside the BPF filesystem --bpffs {}",
                self.pin_dir.display(),
                self.bpffs.display()
            ));
        }
        for (flag, value) in [
            ("--max-services", self.max_services),
            ("--max-slots", self.max_slots),
            ("--max-backends", self.max_backends),
            ("--max-rev-nat", self.max_rev_nat),
            ("--max-affinity", self.max_affinity),
        ] {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        self.health()?;
        Ok(())
    }

    /// The health endpoint's address, `None` when disabled.
    pub fn health(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.health_addr == "off" {
            return Ok(None);
        }
        self.health_addr
            .parse()
            .map(Some)
            .map_err(|e| format!("--health-addr {}: {e}", self.health_addr))
    }

    /// Map capacities to create maps with.
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            services: self.max_services,
            slots: self.max_slots,
            backends: self.max_backends,
            rev_nat: self.max_rev_nat,
            affinity: self.max_affinity,
        }
    }

    /// Settings of the kubernetes source.
    pub fn api(&self) -> kubernetes::Settings {
        kubernetes::Settings {
            kubeconfig: self.kubeconfig.clone(),
            // Empty (an unset ConfigMap key) means: not given.
            api_server: self.api_server.clone().filter(|s| !s.is_empty()),
            node_name: self.node_name.clone(),
        }
    }

    /// Per-service limits.
    pub fn limits(&self) -> Limits {
        Limits {
            max_backends_per_service: self.max_backends_per_service as usize,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AgentArgs, String> {
        let a = AgentArgs::try_parse_from(["lb-agent"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        a.validate()?;
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
    }
}
