//! `lbctl explain`: what the datapath does with traffic to one destination, on each path.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::{ServiceKey, external::EXTERNAL_F_SOURCE_RANGES};
use serde::{Deserialize, Serialize};

use super::{
    external::{info_text, policy_name},
    maglev::table_counts,
    services::row,
};
use crate::{
    addr::{frontend_string, to_socket_addr},
    datapath::Contents,
};

/// A backend's part of a frontend's picks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pick {
    /// The backend.
    pub backend: Option<SocketAddr>,
    /// The share of new connections or flows it gets, in percent.
    pub percent: f64,
}

/// What the socket hooks do with connections from this node's processes to a frontend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SocketPath {
    /// `namespace/name`.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// Service id.
    pub id: u32,
    /// The backends in its slots, with their shares.
    pub backends: Vec<Pick>,
    /// Session affinity timeout (0: none).
    pub affinity_timeout_s: u32,
    /// How the hook picks.
    pub pick: String,
}

/// The XDP program's answer for one built packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XdpRun {
    /// The device whose program ran.
    pub device: String,
    /// Its verdict: `XDP_TX`, `XDP_REDIRECT`, `XDP_PASS`, `XDP_DROP`, `XDP_ABORTED`.
    pub verdict: String,
    /// The packet's source after the program, if it rewrote it. Port 0: SNATed, to a port
    /// taken only when a real flow starts (the run is a dry run).
    pub source: Option<SocketAddr>,
    /// The packet's destination after the program (the backend), if it rewrote it.
    pub destination: Option<SocketAddr>,
    /// What that means.
    pub meaning: String,
}

/// What XDP does with packets from outside to a north-south frontend.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NorthSouthPath {
    /// `namespace/name`.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// North-south service id.
    pub id: u32,
    /// `Cluster` or `Local`.
    pub policy: String,
    /// Whether loadBalancerSourceRanges filter it.
    pub source_ranges: bool,
    /// Maglev table size (0: no backend; new flows are refused under Cluster policy and
    /// dropped under Local).
    pub table_size: u32,
    /// The backends in the table, with their shares of new flows.
    pub backends: Vec<Pick>,
    /// `sessionAffinity: ClientIP` timeout in seconds (0: none): a client's new flows go to
    /// the backend of its last one.
    pub affinity_timeout_s: u32,
    /// The program's own answer for the packet asked about, when it was run.
    pub datapath: Option<XdpRun>,
}

/// `lbctl explain`: what the datapath does with traffic to one address, port and protocol.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    /// `address:port/PROTO`.
    pub destination: String,
    /// The client asked about.
    pub source: SocketAddr,
    /// The socket-level frontend, if the address is one (connections from this node).
    pub socket: Option<SocketPath>,
    /// The north-south frontend, if the address is one (packets from outside).
    pub north_south: Option<NorthSouthPath>,
    /// Why each endpoint of the service is or is not eligible, from the agent.
    pub endpoints: Option<crate::model::ServiceExplanation>,
    /// Why the agent's view is missing, when it is.
    pub endpoints_unavailable: Option<String>,
}

pub(super) fn percent(part: u32, whole: u32) -> f64 {
    (f64::from(part) * 1000.0 / f64::from(whole.max(1))).round() / 10.0
}

/// What the maps say about traffic from `source` to `key` (the datapath run and the agent's
/// endpoint verdicts are added by the caller).
pub fn explain(c: &Contents, key: &ServiceKey, source: SocketAddr) -> Explanation {
    let socket = c.services.get(key).map(|v| {
        let row = row(c, key);
        let mut slots: BTreeMap<u32, u32> = BTreeMap::new();
        for (_, id) in c.live_slots(v) {
            *slots.entry(*id).or_default() += 1;
        }
        let pick = match (v.count, v.affinity_timeout_s) {
            (0, _) => "no backends: connect() and sendmsg() are refused (ECONNREFUSED)".into(),
            (n, 0) => format!(
                "connect() and unconnected sendmsg() take one of {n} slots at random; a \
                 backend's share is its slots"
            ),
            (n, t) => format!(
                "one of {n} slots at random, then ClientIP affinity keeps each client (network \
                 namespace) on its backend for {t}s"
            ),
        };
        SocketPath {
            service: row.service,
            port_name: row.port_name,
            id: v.id,
            backends: slots
                .into_iter()
                .map(|(id, n)| Pick {
                    backend: c.backends.get(&id).map(to_socket_addr),
                    percent: percent(n, u32::from(v.count)),
                })
                .collect(),
            affinity_timeout_s: v.affinity_timeout_s,
            pick,
        }
    });
    let north_south = c.external.get(key).map(|v| {
        let (service, port_name) = info_text(c.external_info.get(&v.id));
        let counts = table_counts(c, v);
        NorthSouthPath {
            service,
            port_name,
            id: v.id,
            policy: policy_name(v.flags).into(),
            source_ranges: v.flags & EXTERNAL_F_SOURCE_RANGES != 0,
            table_size: v.table_size,
            backends: counts
                .into_iter()
                .map(|(id, n)| Pick {
                    backend: c.backends.get(&id).map(to_socket_addr),
                    percent: percent(n, v.table_size),
                })
                .collect(),
            affinity_timeout_s: c.affinity_timeout_of(v),
            datapath: None,
        }
    });
    Explanation {
        destination: frontend_string(key),
        source,
        socket,
        north_south,
        endpoints: None,
        endpoints_unavailable: None,
    }
}

/// The meaning of an XDP verdict on `input`, given the frame it left (`output`).
pub fn xdp_run(device: &str, verdict: i32, input: &[u8], output: &[u8]) -> XdpRun {
    let after = crate::cli::packet::parse(output).ok();
    let rewritten = output != input;
    let (source, destination) = match (&after, rewritten) {
        (Some(p), true) => (Some(p.src), Some(p.dst)),
        _ => (None, None),
    };
    let rejected = verdict == 3 && crate::cli::packet::parse_icmp_error(output).is_ok();
    let (name, meaning) = match (verdict, rewritten) {
        (1, _) => (
            "XDP_DROP",
            "dropped: no local backend (Local policy), a source outside \
             loadBalancerSourceRanges, or no free SNAT port (see lbctl stats)",
        ),
        (3, _) if rejected => (
            "XDP_TX",
            "refused: no backend (Cluster policy), answered with an ICMP port unreachable, \
             as kube-proxy rejects",
        ),
        (2, true) => (
            "XDP_PASS",
            "translated and handed to the stack (a backend on this node, or a next hop the \
             FIB could not resolve)",
        ),
        (2, false) => ("XDP_PASS", "not translated: handed to the stack as it came"),
        (3, _) => (
            "XDP_TX",
            "translated and sent back out of the device it came in by",
        ),
        (4, _) => (
            "XDP_REDIRECT",
            "translated and redirected to another device",
        ),
        _ => ("XDP_ABORTED", "the program failed"),
    };
    XdpRun {
        device: device.to_owned(),
        verdict: name.into(),
        source,
        destination,
        meaning: meaning.into(),
    }
}

/// The explanation as text.
pub fn explain_text(e: &Explanation) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let picks = |b: &[Pick]| -> String {
        b.iter()
            .map(|p| {
                format!(
                    "{} {:.1}%",
                    p.backend.map_or("?".into(), |a| a.to_string()),
                    p.percent
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "{} from {}", e.destination, e.source);
    match &e.socket {
        Some(s) => {
            let _ = writeln!(
                out,
                "socket hooks (connections from this node): {} port {:?}, id {}",
                s.service, s.port_name, s.id
            );
            let _ = writeln!(out, "  backends: {}", picks(&s.backends));
            let _ = writeln!(out, "  pick: {}", s.pick);
        }
        None => {
            let _ = writeln!(out, "socket hooks: not a frontend (not translated)");
        }
    }
    match &e.north_south {
        Some(n) => {
            let _ = writeln!(
                out,
                "XDP (packets from outside): {} port {:?}, id {}, policy {}{}",
                n.service,
                n.port_name,
                n.id,
                n.policy,
                if n.source_ranges {
                    ", source ranges apply"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "  Maglev table of {}: {}",
                n.table_size,
                picks(&n.backends)
            );
            if n.affinity_timeout_s > 0 {
                let _ = writeln!(
                    out,
                    "  then ClientIP affinity keeps each client (address) on its backend for {}s",
                    n.affinity_timeout_s
                );
            }
            if let Some(r) = &n.datapath {
                let _ = writeln!(
                    out,
                    "  xdp_lb on {} says {}: {}",
                    r.device, r.verdict, r.meaning
                );
                match (r.source, r.destination) {
                    (Some(src), Some(dst)) if src.port() == 0 => {
                        let _ = writeln!(
                            out,
                            "    rewritten: {} (SNAT, a port of the range) -> {dst}",
                            src.ip()
                        );
                    }
                    (Some(src), Some(dst)) => {
                        let _ = writeln!(out, "    rewritten: {src} -> {dst}");
                    }
                    _ => {}
                }
            }
        }
        None => {
            let _ = writeln!(out, "XDP: not a north-south frontend");
        }
    }
    if let Some(why) = &e.endpoints_unavailable {
        let _ = writeln!(out, "endpoints: {why}");
    }
    if let Some(explained) = &e.endpoints {
        if let Some(r) = &explained.rejected {
            let _ = writeln!(out, "the service is not programmed: {r}");
        }
        for p in &explained.ports {
            let _ = writeln!(
                out,
                "endpoints of port {:?} {}/{} ({}; internalTrafficPolicy {}, externalTrafficPolicy {}):",
                p.port_name, p.port, p.protocol, p.family, p.internal_policy, p.external_policy,
            );
            let verdict = |v: &crate::model::Verdict| {
                format!("{} ({})", if v.eligible { "yes" } else { "no" }, v.why)
            };
            for ep in &p.endpoints {
                let _ = writeln!(
                    out,
                    "  {} on {}: cluster IP {}; from outside {}",
                    ep.address,
                    ep.node.as_deref().unwrap_or("?"),
                    verdict(&ep.cluster_ip),
                    verdict(&ep.external),
                );
            }
        }
    }
    out
}
