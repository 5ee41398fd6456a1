//! What the CLI shows, computed from the maps' contents: pure, so it is unit-tested.

pub mod packet;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use comfy_table::{Table, presets::NOTHING};
use lb_common::{
    ServiceInfo, ServiceKey,
    ns::{CT_STATE_NAMES, CtEntry, FlowKey, NS_F_LOCAL, NS_F_SOURCE_RANGES, NsCounters},
    stats,
};
use serde::{Deserialize, Serialize};

use crate::{
    addr::{frontend_string, protocol_name, to_ip, to_socket_addr},
    datapath::{Capacities, Contents},
};

/// One frontend, as `lbctl services` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    /// `VIP:port/PROTO`.
    pub frontend: String,
    /// Service id in the maps.
    pub id: u32,
    /// Number of backends.
    pub backends: u16,
    /// `namespace/name` of the Kubernetes service.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
}

/// One slot of a frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRow {
    /// Slot number.
    pub slot: u32,
    /// Backend id.
    pub backend_id: u32,
    /// Backend address, or `None` if the backend is missing (an inconsistency).
    pub backend: Option<SocketAddr>,
}

/// One frontend with its slots, as `lbctl service` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDetail {
    /// The frontend.
    #[serde(flatten)]
    pub row: ServiceRow,
    /// Its slots in order.
    pub slots: Vec<SlotRow>,
}

/// One backend, as `lbctl backends` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    /// Backend id.
    pub id: u32,
    /// Address and port.
    pub address: SocketAddr,
    /// How many frontend slots name it.
    pub slots: usize,
}

fn row(c: &Contents, key: &ServiceKey) -> ServiceRow {
    let value = c.services[key];
    let info = c.info.get(&value.id);
    let text =
        |f: fn(&lb_common::ServiceInfo) -> Option<&str>| info.and_then(f).unwrap_or("?").to_owned();
    ServiceRow {
        frontend: frontend_string(key),
        id: value.id,
        backends: value.count,
        service: format!(
            "{}/{}",
            text(lb_common::ServiceInfo::namespace),
            text(lb_common::ServiceInfo::name)
        ),
        port_name: text(lb_common::ServiceInfo::port_name),
    }
}

/// Every frontend, by service then frontend.
pub fn services(c: &Contents) -> Vec<ServiceRow> {
    let mut rows: Vec<ServiceRow> = c.services.keys().map(|k| row(c, k)).collect();
    rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    rows
}

/// Whether `selector` (`namespace/name`, `VIP:port` or `VIP:port/PROTO`) picks `key`.
fn selects(selector: &str, key: &ServiceKey, row: &ServiceRow) -> bool {
    if selector == row.service {
        return true;
    }
    let addr = match selector.rsplit_once('/') {
        Some((addr, p)) if p.eq_ignore_ascii_case(&protocol_name(key.proto)) => addr,
        Some(_) => return false,
        None => selector,
    };
    addr.parse::<SocketAddr>().is_ok_and(|sa| {
        sa.ip().to_canonical() == to_ip(key.addr) && sa.port() == u16::from_be(key.port_be)
    })
}

/// The frontends `selector` picks, with their slots.
pub fn service_detail(c: &Contents, selector: &str) -> Vec<ServiceDetail> {
    let mut out: Vec<ServiceDetail> = c
        .services
        .iter()
        .filter_map(|(key, value)| {
            let row = row(c, key);
            selects(selector, key, &row).then(|| ServiceDetail {
                slots: c
                    .live_slots(value)
                    .map(|(k, id)| SlotRow {
                        slot: k.index(),
                        backend_id: *id,
                        backend: c.backends.get(id).map(to_socket_addr),
                    })
                    .collect(),
                row,
            })
        })
        .collect();
    out.sort_by(|a, b| a.row.frontend.cmp(&b.row.frontend));
    out
}

/// Every backend with the number of slots naming it.
pub fn backends(c: &Contents) -> Vec<BackendRow> {
    let mut refs: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, id) in c.services.values().flat_map(|v| c.live_slots(v)) {
        *refs.entry(*id).or_default() += 1;
    }
    c.backends
        .iter()
        .map(|(id, ep)| BackendRow {
            id: *id,
            address: to_socket_addr(ep),
            slots: refs.get(id).copied().unwrap_or(0),
        })
        .collect()
}

/// Datapath counters by name.
pub fn stats(totals: &[u64]) -> BTreeMap<&'static str, u64> {
    stats::NAMES
        .iter()
        .copied()
        .zip(totals.iter().copied())
        .collect()
}

/// One north-south frontend, as `lbctl external` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalRow {
    /// `address:port/PROTO` (a node address and node port, a load-balancer IP or an
    /// external IP, with the service port).
    pub frontend: String,
    /// North-south service id (shared by the frontends of one service port and family).
    pub id: u32,
    /// `namespace/name` of the Kubernetes service.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// `Cluster` or `Local` (externalTrafficPolicy).
    pub policy: String,
    /// Whether loadBalancerSourceRanges filter this frontend.
    pub source_ranges: bool,
    /// Distinct backends in the lookup table (0: new flows are dropped).
    pub backends: usize,
    /// Packets, bytes, new flows and drops of the service, summed over CPUs.
    pub counters: Counters,
}

/// A north-south service's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets translated (both directions).
    pub packets: u64,
    /// Their bytes (IP header on).
    pub bytes: u64,
    /// New flows.
    pub flows: u64,
    /// Packets dropped (no backend, source range, no SNAT port).
    pub drops: u64,
}

impl From<NsCounters> for Counters {
    fn from(c: NsCounters) -> Self {
        Self {
            packets: c.packets,
            bytes: c.bytes,
            flows: c.flows,
            drops: c.drops,
        }
    }
}

fn info_text(info: Option<&ServiceInfo>) -> (String, String) {
    let text = |f: fn(&ServiceInfo) -> Option<&str>| info.and_then(f).unwrap_or("?").to_owned();
    (
        format!(
            "{}/{}",
            text(ServiceInfo::namespace),
            text(ServiceInfo::name)
        ),
        text(ServiceInfo::port_name),
    )
}

fn distinct_backends(table: Option<&[u32]>) -> usize {
    table.map_or(0, |t| {
        t.iter()
            .filter(|id| **id != 0)
            .collect::<BTreeSet<_>>()
            .len()
    })
}

/// Every north-south frontend, by service then frontend; `counters` by service id.
pub fn external(c: &Contents, counters: &BTreeMap<u32, NsCounters>) -> Vec<ExternalRow> {
    let mut rows: Vec<ExternalRow> = c
        .external
        .iter()
        .map(|(key, v)| {
            let (service, port_name) = info_text(c.external_info.get(&v.id));
            ExternalRow {
                frontend: frontend_string(key),
                id: v.id,
                service,
                port_name,
                policy: if v.flags & NS_F_LOCAL != 0 {
                    "Local"
                } else {
                    "Cluster"
                }
                .into(),
                source_ranges: v.flags & NS_F_SOURCE_RANGES != 0,
                backends: distinct_backends(c.table_of(v)),
                counters: counters
                    .get(&v.id)
                    .copied()
                    .map(Counters::from)
                    .unwrap_or_default(),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, &a.frontend).cmp(&(&b.service, &b.frontend)));
    rows
}

/// One backend's part of a Maglev table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Share {
    /// Backend id.
    pub backend_id: u32,
    /// Its address, or `None` if the backend is missing (an inconsistency).
    pub backend: Option<SocketAddr>,
    /// Table entries naming it.
    pub entries: u32,
    /// The share of new flows it gets, in percent.
    pub percent: f64,
}

/// A north-south service's Maglev table, summarised, as `lbctl maglev` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MaglevSummary {
    /// North-south service id.
    pub id: u32,
    /// `namespace/name`.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// Its frontends.
    pub frontends: Vec<String>,
    /// First entry of its table in the table array.
    pub offset: u32,
    /// Table size (a prime; 0 when it has no backend).
    pub size: u32,
    /// Backends by id, with their shares.
    pub shares: Vec<Share>,
}

/// How many entries of a north-south frontend's table name each backend id.
fn table_counts(c: &Contents, v: &lb_common::ns::NsService) -> BTreeMap<u32, u32> {
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    for id in c.table_of(v).into_iter().flatten() {
        *counts.entry(*id).or_default() += 1;
    }
    counts
}

/// The Maglev tables of the north-south services `selector` picks (`namespace/name` or a
/// frontend, as for `lbctl service`; empty: all).
pub fn maglev(c: &Contents, selector: &str) -> Vec<MaglevSummary> {
    let mut by_id: BTreeMap<u32, MaglevSummary> = BTreeMap::new();
    for (key, v) in &c.external {
        let (service, port_name) = info_text(c.external_info.get(&v.id));
        let row = ServiceRow {
            frontend: frontend_string(key),
            id: v.id,
            backends: 0,
            service: service.clone(),
            port_name: port_name.clone(),
        };
        if !selector.is_empty() && !selects(selector, key, &row) {
            // Another frontend of the same service may still select it.
            continue;
        }
        let summary = by_id.entry(v.id).or_insert_with(|| {
            let counts = table_counts(c, v);
            let size = v.ring_size;
            MaglevSummary {
                id: v.id,
                service,
                port_name,
                frontends: Vec::new(),
                offset: v.ring_off,
                size,
                shares: counts
                    .into_iter()
                    .map(|(id, entries)| Share {
                        backend_id: id,
                        backend: c.backends.get(&id).map(to_socket_addr),
                        entries,
                        percent: f64::from(entries) * 100.0 / f64::from(size.max(1)),
                    })
                    .collect(),
            }
        });
        summary.frontends.push(frontend_string(key));
    }
    by_id.into_values().collect()
}

/// One tracked north-south flow, as `lbctl conntrack` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRow {
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The client's address and port.
    pub client: SocketAddr,
    /// The frontend it reached.
    pub frontend: SocketAddr,
    /// The backend it goes to.
    pub backend: SocketAddr,
    /// The node address and port it is SNATed to, if any.
    pub snat: Option<SocketAddr>,
    /// `namespace/name` of the service.
    pub service: String,
    /// Its state (`syn`, `established`, `close_wait`, `closed`, `udp`, `udp_stream`), or
    /// `expired` (the programs ignore it; the next sweep removes it).
    pub state: String,
    /// Seconds since the flow started.
    pub age_s: u64,
    /// Seconds until it expires unless a packet comes (zero: expired).
    pub expires_in_s: u64,
}

/// Tracked flows at time `now` (the programs' conntrack clock,
/// [`crate::datapath::conntrack::clock_now`]), by service then client.
pub fn flows(c: &Contents, entries: &[(FlowKey, CtEntry)], now: u32) -> Vec<FlowRow> {
    let mut rows: Vec<FlowRow> = entries
        .iter()
        .map(|(k, e)| FlowRow {
            protocol: protocol_name(k.proto),
            client: SocketAddr::new(to_ip(k.saddr), u16::from_be(k.sport_be)),
            frontend: SocketAddr::new(to_ip(k.daddr), u16::from_be(k.dport_be)),
            backend: to_socket_addr(&e.backend),
            snat: e
                .is_snat()
                .then(|| SocketAddr::new(to_ip(e.snat_addr), u16::from_be(e.snat_port_be))),
            service: info_text(c.external_info.get(&e.svc_id)).0,
            state: if e.expired(now) {
                "expired".into()
            } else {
                CT_STATE_NAMES[e.state(k.proto)].into()
            },
            age_s: u64::from(now.saturating_sub(e.created)),
            expires_in_s: u64::from(e.expires.saturating_sub(now)),
        })
        .collect();
    rows.sort_by(|a, b| (&a.service, a.client).cmp(&(&b.service, b.client)));
    rows
}

/// `lbctl external` as a table.
pub fn external_table(rows: &[ExternalRow]) -> String {
    table(
        &[
            "FRONTEND", "SERVICE", "PORT", "POLICY", "RANGES", "BACKENDS", "PACKETS", "BYTES",
            "FLOWS", "DROPS", "ID",
        ],
        rows.iter().map(|r| {
            vec![
                r.frontend.clone(),
                r.service.clone(),
                r.port_name.clone(),
                r.policy.clone(),
                if r.source_ranges { "yes" } else { "-" }.into(),
                r.backends.to_string(),
                r.counters.packets.to_string(),
                r.counters.bytes.to_string(),
                r.counters.flows.to_string(),
                r.counters.drops.to_string(),
                r.id.to_string(),
            ]
        }),
    )
}

/// `lbctl maglev` as text.
pub fn maglev_text(summaries: &[MaglevSummary]) -> String {
    summaries
        .iter()
        .map(|m| {
            let shares = table(
                &["BACKEND-ID", "BACKEND", "ENTRIES", "SHARE"],
                m.shares.iter().map(|s| {
                    vec![
                        s.backend_id.to_string(),
                        s.backend.map_or("MISSING".into(), |b| b.to_string()),
                        s.entries.to_string(),
                        format!("{:.2}%", s.percent),
                    ]
                }),
            );
            format!(
                "{} (port {:?}), id {}, table of {} at {}, frontends {}\n{}",
                m.service,
                m.port_name,
                m.id,
                m.size,
                m.offset,
                m.frontends.join(" "),
                shares
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `lbctl conntrack` as a table.
pub fn flows_table(rows: &[FlowRow]) -> String {
    table(
        &[
            "PROTO", "CLIENT", "FRONTEND", "BACKEND", "SNAT", "SERVICE", "STATE", "AGE", "EXPIRES",
        ],
        rows.iter().map(|r| {
            vec![
                r.protocol.clone(),
                r.client.to_string(),
                r.frontend.to_string(),
                r.backend.to_string(),
                r.snat.map_or("-".into(), |b| b.to_string()),
                r.service.clone(),
                r.state.clone(),
                format!("{}s", r.age_s),
                format!("{}s", r.expires_in_s),
            ]
        }),
    )
}

fn table(header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING).set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    // comfy-table pads each line on the left; trim it for plain, kubectl-like output.
    t.lines().map(|l| l.trim().to_owned() + "\n").collect()
}

/// `lbctl services` as a table.
pub fn services_table(rows: &[ServiceRow]) -> String {
    table(
        &["FRONTEND", "BACKENDS", "SERVICE", "PORT", "ID"],
        rows.iter().map(|r| {
            vec![
                r.frontend.clone(),
                r.backends.to_string(),
                r.service.clone(),
                r.port_name.clone(),
                r.id.to_string(),
            ]
        }),
    )
}

/// `lbctl service` as text.
pub fn detail_text(details: &[ServiceDetail]) -> String {
    details
        .iter()
        .map(|d| {
            let r = &d.row;
            let slots = table(
                &["SLOT", "BACKEND-ID", "BACKEND"],
                d.slots.iter().map(|s| {
                    vec![
                        s.slot.to_string(),
                        s.backend_id.to_string(),
                        s.backend.map_or("MISSING".into(), |b| b.to_string()),
                    ]
                }),
            );
            format!(
                "{} -> {} (port {:?}), id {}, {} backends\n{}",
                r.frontend, r.service, r.port_name, r.id, r.backends, slots
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `lbctl backends` as a table.
pub fn backends_table(rows: &[BackendRow]) -> String {
    table(
        &["ID", "ADDRESS", "SLOTS"],
        rows.iter()
            .map(|r| vec![r.id.to_string(), r.address.to_string(), r.slots.to_string()]),
    )
}

/// `lbctl stats` as a table.
pub fn stats_table(stats: &BTreeMap<&'static str, u64>) -> String {
    table(
        &["COUNTER", "VALUE"],
        stats
            .iter()
            .map(|(k, v)| vec![k.to_string(), v.to_string()]),
    )
}

/// A client kept on a backend by session affinity, as `lbctl affinity` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AffinityRow {
    /// The frontend (`address:port/PROTO`), if the service id is still programmed.
    pub frontend: Option<String>,
    /// `namespace/name`.
    pub service: String,
    /// `socket` (connections made on this node) or `north-south` (traffic from outside).
    pub path: String,
    /// The client: on the socket path its network namespace's cookie, `netns:<cookie>`
    /// (`ClientIP` affinity is kept per network namespace: a pod, or the node); north-south
    /// its address.
    pub client: String,
    /// The backend it is kept on.
    pub backend: Option<SocketAddr>,
    /// Seconds since its last connection.
    pub idle_s: u64,
    /// Seconds until the entry expires (0: expired; the next connection picks anew).
    pub expires_in_s: u64,
    /// Whether the backend still serves the service (an entry naming a removed backend is
    /// ignored).
    pub honoured: bool,
}

/// The affinity entries `entries`, at `now_ns` on the hooks' coarse monotonic clock.
pub fn affinity(
    c: &Contents,
    entries: &[(lb_common::AffinityKey, lb_common::AffinityValue)],
    now_ns: u64,
) -> Vec<AffinityRow> {
    let by_id: BTreeMap<u32, &ServiceKey> = c.services.iter().map(|(k, v)| (v.id, k)).collect();
    let mut rows: Vec<AffinityRow> = entries
        .iter()
        .map(|(k, v)| {
            let key = by_id.get(&k.svc_id);
            let timeout = key
                .and_then(|key| c.services.get(key))
                .map_or(0, |s| u64::from(s.affinity_timeout_s));
            let idle_s = now_ns.saturating_sub(v.last_used_ns) / 1_000_000_000;
            let (service, _) = info_text(c.info.get(&k.svc_id));
            AffinityRow {
                frontend: key.map(|key| frontend_string(key)),
                service,
                path: "socket".into(),
                client: format!("netns:{}", k.netns_cookie),
                backend: c.backends.get(&v.backend_id).map(to_socket_addr),
                idle_s,
                expires_in_s: timeout.saturating_sub(idle_s),
                honoured: c.affinity_match.contains(&lb_common::AffinityMatchKey {
                    svc_id: k.svc_id,
                    backend_id: v.backend_id,
                }),
            }
        })
        .collect();
    sort_affinity(&mut rows);
    rows
}

/// The north-south affinity entries `entries` at `now` (seconds of the conntrack clock):
/// one row per client and service port, under the first of its frontends.
pub fn ns_affinity(
    c: &Contents,
    entries: &[(lb_common::ns::NsAffinityKey, lb_common::ns::NsAffinityValue)],
    now: u32,
) -> Vec<AffinityRow> {
    let mut by_id: BTreeMap<u32, &ServiceKey> = BTreeMap::new();
    for (k, v) in &c.external {
        by_id.entry(v.id).or_insert(k);
    }
    let mut rows: Vec<AffinityRow> = entries
        .iter()
        .map(|(k, v)| {
            let mark = lb_common::ns::NsAffinityMatchKey {
                svc_id: k.svc_id,
                backend: v.backend.endpoint(),
            };
            // No mark: the backend left the table, and the entry is not honoured.
            let timeout = c.external_match.get(&mark).copied();
            let idle_s = now.saturating_sub(v.last_used);
            AffinityRow {
                frontend: by_id.get(&k.svc_id).map(|key| frontend_string(key)),
                service: info_text(c.external_info.get(&k.svc_id)).0,
                path: "north-south".into(),
                client: to_ip(k.client).to_string(),
                backend: Some(to_socket_addr(&v.backend.endpoint())),
                idle_s: u64::from(idle_s),
                expires_in_s: u64::from(timeout.unwrap_or(0).saturating_sub(idle_s)),
                honoured: timeout.is_some_and(|t| v.holds(now, t)),
            }
        })
        .collect();
    sort_affinity(&mut rows);
    rows
}

/// Affinity rows by service, frontend, path and client.
pub fn sort_affinity(rows: &mut [AffinityRow]) {
    rows.sort_by(|a, b| {
        (&a.service, &a.frontend, &a.path, &a.client).cmp(&(
            &b.service,
            &b.frontend,
            &b.path,
            &b.client,
        ))
    });
}

/// The affinity entries as a table.
pub fn affinity_table(rows: &[AffinityRow]) -> String {
    table(
        &[
            "FRONTEND",
            "SERVICE",
            "PATH",
            "CLIENT",
            "BACKEND",
            "IDLE",
            "EXPIRES IN",
            "HONOURED",
        ],
        rows.iter().map(|r| {
            vec![
                r.frontend.clone().unwrap_or_else(|| "(gone)".into()),
                r.service.clone(),
                r.path.clone(),
                r.client.clone(),
                r.backend.map_or("?".into(), |b| b.to_string()),
                format!("{}s", r.idle_s),
                format!("{}s", r.expires_in_s),
                if r.honoured { "yes" } else { "no" }.into(),
            ]
        }),
    )
}

/// One frontend's traffic, as `lbctl stats --services` lists it (an `ipvsadm --stats` view).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatsRow {
    /// `address:port/PROTO`.
    pub frontend: String,
    /// `socket` (connections from this node's processes) or `north-south` (packets from
    /// outside, in XDP).
    pub path: String,
    /// `namespace/name`.
    pub service: String,
    /// The service port's name.
    pub port_name: String,
    /// New connections (socket: connects and unconnected datagrams translated; north-south:
    /// new flows).
    pub connections: u64,
    /// Refused (socket: no backend) or dropped (north-south: no backend, source range, no
    /// SNAT port).
    pub rejected: u64,
    /// Packets translated (north-south only: the socket hooks see no packets).
    pub packets: Option<u64>,
    /// Their bytes (north-south only).
    pub bytes: Option<u64>,
}

/// One backend's new connections from the socket hooks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatsRow {
    /// Backend id.
    pub id: u32,
    /// Address and port.
    pub address: SocketAddr,
    /// Connections and unconnected datagrams translated to it.
    pub connections: u64,
}

/// Every frontend's counters: socket ones by service id (`socket`), north-south ones by
/// north-south service id (`north_south`; shared by the frontends of one service port).
pub fn service_stats(
    c: &Contents,
    socket: &BTreeMap<u32, lb_common::stats::SocketCounters>,
    north_south: &BTreeMap<u32, NsCounters>,
) -> Vec<ServiceStatsRow> {
    let mut rows: Vec<ServiceStatsRow> = c
        .services
        .iter()
        .map(|(key, v)| {
            let r = row(c, key);
            let n = socket.get(&v.id).copied().unwrap_or_default();
            ServiceStatsRow {
                frontend: r.frontend,
                path: "socket".into(),
                service: r.service,
                port_name: r.port_name,
                connections: n.translated,
                rejected: n.refused,
                packets: None,
                bytes: None,
            }
        })
        .collect();
    rows.extend(c.external.iter().map(|(key, v)| {
        let (service, port_name) = info_text(c.external_info.get(&v.id));
        let n = north_south.get(&v.id).copied().unwrap_or_default();
        ServiceStatsRow {
            frontend: frontend_string(key),
            path: "north-south".into(),
            service,
            port_name,
            connections: n.flows,
            rejected: n.drops,
            packets: Some(n.packets),
            bytes: Some(n.bytes),
        }
    }));
    rows.sort_by(|a, b| {
        (&a.service, &a.path, &a.frontend).cmp(&(&b.service, &b.path, &b.frontend))
    });
    rows
}

/// Every backend's connection count (`counts` by backend id).
pub fn backend_stats(c: &Contents, counts: &BTreeMap<u32, u64>) -> Vec<BackendStatsRow> {
    c.backends
        .iter()
        .map(|(id, ep)| BackendStatsRow {
            id: *id,
            address: to_socket_addr(ep),
            connections: counts.get(id).copied().unwrap_or_default(),
        })
        .collect()
}

/// The per-service counters as a table.
pub fn service_stats_table(rows: &[ServiceStatsRow]) -> String {
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    table(
        &[
            "FRONTEND",
            "PATH",
            "SERVICE",
            "PORT",
            "CONNECTIONS",
            "REJECTED",
            "PACKETS",
            "BYTES",
        ],
        rows.iter().map(|r| {
            vec![
                r.frontend.clone(),
                r.path.clone(),
                r.service.clone(),
                r.port_name.clone(),
                r.connections.to_string(),
                r.rejected.to_string(),
                opt(r.packets),
                opt(r.bytes),
            ]
        }),
    )
}

/// The per-backend counters as a table.
pub fn backend_stats_table(rows: &[BackendStatsRow]) -> String {
    table(
        &["BACKEND", "ID", "CONNECTIONS"],
        rows.iter().map(|r| {
            vec![
                r.address.to_string(),
                r.id.to_string(),
                r.connections.to_string(),
            ]
        }),
    )
}

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
    pub endpoints: Option<serde_json::Value>,
    /// Why the agent's view is missing, when it is.
    pub endpoints_unavailable: Option<String>,
}

fn percent(part: u32, whole: u32) -> f64 {
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
            policy: if v.flags & NS_F_LOCAL != 0 {
                "Local"
            } else {
                "Cluster"
            }
            .into(),
            source_ranges: v.flags & NS_F_SOURCE_RANGES != 0,
            table_size: v.ring_size,
            backends: counts
                .into_iter()
                .map(|(id, n)| Pick {
                    backend: c.backends.get(&id).map(to_socket_addr),
                    percent: percent(n, v.ring_size),
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
    if let Some(ports) = e.endpoints.as_ref().and_then(|v| v["ports"].as_array()) {
        if let Some(r) = e.endpoints.as_ref().and_then(|v| v["rejected"].as_str()) {
            let _ = writeln!(out, "the service is not programmed: {r}");
        }
        for p in ports {
            let _ = writeln!(
                out,
                "endpoints of port {} {}/{} ({}; internalTrafficPolicy {}, externalTrafficPolicy {}):",
                p["port_name"],
                p["port"],
                p["protocol"].as_str().unwrap_or("?"),
                p["family"].as_str().unwrap_or("?"),
                p["internal_policy"].as_str().unwrap_or("?"),
                p["external_policy"].as_str().unwrap_or("?"),
            );
            for ep in p["endpoints"].as_array().into_iter().flatten() {
                let verdict = |v: &serde_json::Value| {
                    format!(
                        "{} ({})",
                        if v["eligible"] == true { "yes" } else { "no" },
                        v["why"].as_str().unwrap_or("?")
                    )
                };
                let _ = writeln!(
                    out,
                    "  {} on {}: cluster IP {}; from outside {}",
                    ep["address"].as_str().unwrap_or("?"),
                    ep["node"].as_str().unwrap_or("?"),
                    verdict(&ep["cluster_ip"]),
                    verdict(&ep["external"]),
                );
            }
        }
    }
    out
}

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CapacityRow {
    /// The map's name.
    pub map: String,
    /// The agent flag that sets its capacity.
    pub flag: String,
    /// Entries in it now.
    pub entries: u64,
    /// Its capacity.
    pub capacity: u64,
    /// The capacity the current state needs: its entries, and for the slot map and the
    /// table array room to write the largest table beside the one it replaces (a change
    /// switches to a whole new table; without that room the change is refused).
    pub needed: u64,
    /// `entries` as a share of `capacity`, in percent.
    pub fill_percent: f64,
    /// What happens when it is full.
    pub when_full: String,
}

fn fill(
    map: &str,
    flag: &str,
    (entries, needed): (u64, u64),
    capacity: u64,
    when_full: &str,
) -> CapacityRow {
    CapacityRow {
        map: map.to_owned(),
        flag: flag.to_owned(),
        entries,
        capacity,
        needed,
        fill_percent: if capacity == 0 {
            0.0
        } else {
            (entries as f64 * 1000.0 / capacity as f64).round() / 10.0
        },
        when_full: when_full.to_owned(),
    }
}

/// The fill of every map with a capacity: those the agent writes (from `c` and `caps`; the
/// Maglev array counts the table entries in use) and the LRU maps the programs write
/// (`lru`: name, entries, capacity).
pub fn capacity(
    c: &Contents,
    caps: &Capacities,
    lru: &[(&'static str, u64, u64)],
) -> Vec<CapacityRow> {
    use lb_common::maps;
    const REFUSED: &str = "new services refused, the rest kept";
    let n = |x: usize| x as u64;
    let table_entries: u64 = c.tables.values().map(|t| t.len() as u64).sum();
    let largest_slots = c.services.values().map(|v| u64::from(v.count)).max();
    let largest_table = c.tables.values().map(|t| t.len() as u64).max();
    // The maps the agent writes: a change that does not fit is refused.
    let written: [(&str, &str, u64, u64); 9] = [
        (
            maps::SERVICES,
            "--max-services",
            n(c.services.len()),
            caps.services.into(),
        ),
        (
            maps::SLOTS,
            "--max-slots",
            n(c.slots.len()),
            caps.slots.into(),
        ),
        (
            maps::BACKENDS,
            "--max-backends",
            n(c.backends.len()),
            caps.backends.into(),
        ),
        (
            maps::AFFINITY_MATCH,
            "--max-slots",
            n(c.affinity_match.len()),
            caps.affinity_match.into(),
        ),
        (
            maps::NS_SERVICES,
            "--max-external-frontends",
            n(c.external.len()),
            caps.external.into(),
        ),
        (
            maps::NS_INFO,
            "--max-external-services",
            n(c.external_info.len()),
            caps.external_ids.into(),
        ),
        (
            maps::RINGS,
            "--maglev-table-entries",
            table_entries,
            caps.table_entries.into(),
        ),
        (
            maps::SOURCE_RANGES,
            "--max-source-ranges",
            n(c.ranges.len()),
            caps.ranges.into(),
        ),
        (
            maps::NS_AFFINITY_MATCH,
            "--max-slots",
            n(c.external_match.len()),
            caps.external_match.into(),
        ),
    ];
    let mut rows: Vec<CapacityRow> = written
        .into_iter()
        .map(|(map, flag, entries, cap)| {
            let room = match map {
                maps::SLOTS => largest_slots,
                maps::RINGS => largest_table,
                _ => None,
            };
            let needed = entries + room.unwrap_or(0);
            fill(map, flag, (entries, needed), cap, REFUSED)
        })
        .collect();
    for (name, entries, cap) in lru {
        if *name == maps::UDP_SOCKETS {
            rows.push(fill(
                name,
                "--max-rev-nat",
                (*entries, *entries),
                *cap,
                "new connected UDP sockets are found through the reverse-NAT map only (counted)",
            ));
            continue;
        }
        let flag = match *name {
            maps::REV_NAT => "--max-rev-nat",
            maps::AFFINITY | maps::NS_AFFINITY => "--max-affinity",
            maps::CT_NEW | maps::NAT_REV_NEW => "--max-new-flows",
            _ => "--max-flows",
        };
        rows.push(fill(
            name,
            flag,
            (*entries, *entries),
            *cap,
            "the least recently used are evicted",
        ));
    }
    rows
}

/// The capacity view as a table.
pub fn capacity_table(rows: &[CapacityRow]) -> String {
    table(
        &[
            "MAP",
            "ENTRIES",
            "CAPACITY",
            "FILL",
            "NEEDS",
            "FLAG",
            "WHEN FULL",
        ],
        rows.iter().map(|r| {
            vec![
                r.map.clone(),
                r.entries.to_string(),
                r.capacity.to_string(),
                format!("{:.1}%", r.fill_percent),
                r.needed.to_string(),
                r.flag.clone(),
                r.when_full.clone(),
            ]
        }),
    )
}

/// `lbctl capacity --namespaces` as a table.
pub fn shares_table(rows: &[crate::model::share::Row]) -> String {
    table(
        &["NAMESPACE", "MAP", "USED", "SHARE", "FILL", "WAITING"],
        rows.iter().map(|r| {
            vec![
                r.namespace.clone(),
                r.map.clone(),
                r.used.to_string(),
                r.share.to_string(),
                format!("{:.1}%", r.used as f64 * 100.0 / r.share.max(1) as f64),
                r.waiting.to_string(),
            ]
        }),
    )
}

#[cfg(test)]
mod tests {
    use lb_common::{ServiceInfo, ServiceValue, proto};

    use super::*;
    use crate::addr::to_addr6;

    fn contents() -> Contents {
        let mut c = Contents::default();
        let dns_udp = ServiceKey::new(
            to_addr6("10.96.0.10".parse().unwrap()),
            53u16.to_be(),
            proto::UDP,
        );
        let web = ServiceKey::new(
            to_addr6("fd00::1".parse().unwrap()),
            80u16.to_be(),
            proto::TCP,
        );
        c.services.insert(
            dns_udp,
            ServiceValue {
                id: 1,
                count: 2,
                flags: 0,
                affinity_timeout_s: 0,
            },
        );
        c.services.insert(
            web,
            ServiceValue {
                id: 2,
                count: 1,
                flags: 0,
                affinity_timeout_s: 0,
            },
        );
        c.info
            .insert(1, ServiceInfo::new("kube-system", "dns", "dns").unwrap());
        c.info
            .insert(2, ServiceInfo::new("prod", "web", "").unwrap());
        c.backends
            .insert(1, crate::testutil::backend("10.0.0.1:53"));
        c.backends
            .insert(2, crate::testutil::backend("10.0.0.2:53"));
        c.backends
            .insert(3, crate::testutil::backend("[fd00::5]:8080"));
        c.slots.insert(lb_common::SlotKey { svc_id: 1, slot: 0 }, 1);
        c.slots.insert(lb_common::SlotKey { svc_id: 1, slot: 1 }, 2);
        c.slots.insert(lb_common::SlotKey { svc_id: 2, slot: 0 }, 3);
        c
    }

    #[test]
    fn explain_reads_the_frontend_its_backends_and_how_one_is_picked() {
        let c = contents();
        let key = ServiceKey::new(
            to_addr6("10.96.0.10".parse().unwrap()),
            53u16.to_be(),
            proto::UDP,
        );
        let e = explain(&c, &key, "198.18.0.1:40000".parse().unwrap());
        assert_eq!(e.destination, "10.96.0.10:53/UDP");
        let s = e.socket.expect("a socket frontend");
        assert_eq!((s.service.as_str(), s.id), ("kube-system/dns", 1));
        let picks: Vec<(String, f64)> = s
            .backends
            .iter()
            .map(|p| (p.backend.unwrap().to_string(), p.percent))
            .collect();
        assert_eq!(
            picks,
            [
                ("10.0.0.1:53".to_string(), 50.0),
                ("10.0.0.2:53".to_string(), 50.0)
            ]
        );
        assert!(s.pick.contains("one of 2 slots at random"), "{}", s.pick);
        assert!(e.north_south.is_none());
        let text = explain_text(&explain(&c, &key, "198.18.0.1:40000".parse().unwrap()));
        assert!(text.contains("XDP: not a north-south frontend"), "{text}");
        // A verdict that rewrote the packet names where it goes.
        let f = crate::cli::packet::frame(
            proto::TCP,
            "1.1.1.1:1".parse().unwrap(),
            "2.2.2.2:2".parse().unwrap(),
            b"",
        );
        let g = crate::cli::packet::frame(
            proto::TCP,
            "3.3.3.3:3".parse().unwrap(),
            "4.4.4.4:4".parse().unwrap(),
            b"",
        );
        let run = xdp_run("eth0", 3, &f, &g);
        assert_eq!(run.verdict, "XDP_TX");
        assert_eq!(run.destination, Some("4.4.4.4:4".parse().unwrap()));
        assert_eq!(
            xdp_run("eth0", 2, &f, &f).meaning,
            "not translated: handed to the stack as it came"
        );
    }

    #[test]
    fn affinity_entries_show_time_left_and_whether_they_are_honoured() {
        use lb_common::{AffinityKey, AffinityMatchKey, AffinityValue};
        let mut c = contents();
        for v in c.services.values_mut() {
            v.affinity_timeout_s = 100;
        }
        c.affinity_match.insert(AffinityMatchKey {
            svc_id: 1,
            backend_id: 2,
        });
        let entry = |svc_id, backend_id, last_used_s: u64| {
            (
                AffinityKey::new(svc_id, 7),
                AffinityValue {
                    backend_id,
                    _pad: 0,
                    last_used_ns: last_used_s * 1_000_000_000,
                },
            )
        };
        let rows = affinity(
            &c,
            &[entry(1, 2, 970), entry(1, 1, 800), entry(9, 1, 999)],
            1_000_000_000_000,
        );
        let got: Vec<(Option<String>, u64, u64, bool)> = rows
            .iter()
            .map(|r| (r.frontend.clone(), r.idle_s, r.expires_in_s, r.honoured))
            .collect();
        assert_eq!(
            got,
            [
                (None, 1, 0, false),
                (Some("10.96.0.10:53/UDP".into()), 30, 70, true),
                (Some("10.96.0.10:53/UDP".into()), 200, 0, false),
            ]
        );
        assert!(affinity_table(&rows).contains("(gone)"));
    }

    #[test]
    fn lists_services_by_name() {
        let rows = services(&contents());
        let names: Vec<_> = rows
            .iter()
            .map(|r| (r.service.as_str(), r.frontend.as_str(), r.backends))
            .collect();
        assert_eq!(
            names,
            [
                ("kube-system/dns", "10.96.0.10:53/UDP", 2),
                ("prod/web", "[fd00::1]:80/TCP", 1)
            ]
        );
        let text = services_table(&rows);
        assert!(text.starts_with("FRONTEND"), "{text}");
        assert!(text.contains("10.96.0.10:53/UDP"), "{text}");
    }

    #[test]
    fn selects_by_name_and_by_frontend() {
        let c = contents();
        for sel in [
            "kube-system/dns",
            "10.96.0.10:53",
            "10.96.0.10:53/udp",
            "10.96.0.10:53/UDP",
        ] {
            let d = service_detail(&c, sel);
            assert_eq!(d.len(), 1, "{sel}");
            assert_eq!(
                d[0].slots
                    .iter()
                    .map(|s| s.backend.unwrap().to_string())
                    .collect::<Vec<_>>(),
                ["10.0.0.1:53", "10.0.0.2:53"]
            );
        }
        assert_eq!(service_detail(&c, "10.96.0.10:53/TCP").len(), 0);
        assert_eq!(service_detail(&c, "[fd00::1]:80").len(), 1);
        assert_eq!(service_detail(&c, "nope/nope").len(), 0);
    }

    fn with_external() -> Contents {
        use lb_common::ns::NsService;
        let mut c = contents();
        let lb = ServiceKey::new(
            to_addr6("198.51.100.1".parse().unwrap()),
            80u16.to_be(),
            proto::TCP,
        );
        let np = ServiceKey::new(
            to_addr6("192.0.2.1".parse().unwrap()),
            30080u16.to_be(),
            proto::TCP,
        );
        let v = NsService {
            id: 4,
            ring_off: 7,
            ring_size: 5,
            flags: NS_F_LOCAL | NS_F_SOURCE_RANGES,
            _pad: 0,
        };
        c.external.insert(lb, v);
        c.external.insert(
            np,
            NsService {
                flags: NS_F_LOCAL,
                ..v
            },
        );
        c.tables.insert(7, vec![1, 2, 1, 2, 1]);
        c.external_info
            .insert(4, ServiceInfo::new("prod", "edge", "http").unwrap());
        c
    }

    #[test]
    fn north_south_affinity_rows_follow_the_marks_and_the_timeout() {
        use lb_common::ns::{NsAffinityKey, NsAffinityMatchKey, NsAffinityValue};
        let mut c = with_external();
        let backend =
            lb_common::Endpoint::new(to_addr6("10.0.0.2".parse().unwrap()), 53u16.to_be());
        let gone = lb_common::Endpoint::new(to_addr6("10.0.0.9".parse().unwrap()), 53u16.to_be());
        c.external_match
            .insert(NsAffinityMatchKey { svc_id: 4, backend }, 100);
        let entry = |client: &str, backend, last_used| {
            (
                NsAffinityKey {
                    svc_id: 4,
                    client: to_addr6(client.parse().unwrap()),
                },
                NsAffinityValue {
                    backend: lb_common::Backend::new(backend, lb_common::node::UNKNOWN),
                    last_used,
                },
            )
        };
        let rows = ns_affinity(
            &c,
            &[
                entry("203.0.113.7", backend, 970),
                entry("2001:db8::7", backend, 850),
                entry("203.0.113.8", gone, 990),
            ],
            1000,
        );
        let got: Vec<(&str, u64, u64, bool)> = rows
            .iter()
            .map(|r| (r.client.as_str(), r.idle_s, r.expires_in_s, r.honoured))
            .collect();
        assert_eq!(
            got,
            [
                ("2001:db8::7", 150, 0, false),
                ("203.0.113.7", 30, 70, true),
                // Its backend left the table (no mark): not honoured.
                ("203.0.113.8", 10, 0, false),
            ]
        );
        assert!(
            rows.iter()
                .all(|r| r.service == "prod/edge" && r.path == "north-south")
        );
        let text = affinity_table(&rows);
        assert!(
            text.contains("north-south") && text.contains("203.0.113.7"),
            "{text}"
        );
    }

    #[test]
    fn north_south_frontends_tables_and_flows() {
        let c = with_external();
        let counters = BTreeMap::from([(
            4,
            NsCounters {
                packets: 10,
                bytes: 1000,
                flows: 2,
                drops: 1,
            },
        )]);
        let rows = external(&c, &counters);
        let view: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.frontend.as_str(),
                    r.policy.as_str(),
                    r.source_ranges,
                    r.backends,
                )
            })
            .collect();
        assert_eq!(
            view,
            [
                ("192.0.2.1:30080/TCP", "Local", false, 2),
                ("198.51.100.1:80/TCP", "Local", true, 2)
            ]
        );
        assert_eq!(rows[0].counters.packets, 10);
        assert!(external_table(&rows).contains("prod/edge"));

        let m = maglev(&c, "prod/edge");
        assert_eq!(m.len(), 1, "one table for both frontends");
        assert_eq!(m[0].frontends.len(), 2);
        let shares: Vec<_> = m[0]
            .shares
            .iter()
            .map(|s| (s.backend_id, s.entries))
            .collect();
        assert_eq!(shares, [(1, 3), (2, 2)]);
        assert!((m[0].shares[0].percent - 60.0).abs() < 1e-9);
        assert_eq!(maglev(&c, "198.51.100.1:80/TCP").len(), 1);
        assert!(maglev(&c, "prod/other").is_empty());
        assert!(maglev_text(&m).contains("60.00%"));

        let key = FlowKey::new(
            to_addr6("203.0.113.7".parse().unwrap()),
            to_addr6("198.51.100.1".parse().unwrap()),
            40000u16.to_be(),
            80u16.to_be(),
            proto::TCP,
        );
        let flags = lb_common::ns::CT_SEEN | lb_common::ns::TCP_SYN | lb_common::ns::TCP_ACK;
        let ct = CtEntry {
            backend: lb_common::Endpoint::new(to_addr6("10.0.0.2".parse().unwrap()), 53u16.to_be()),
            svc_id: 4,
            snat_addr: to_addr6("192.0.2.1".parse().unwrap()),
            snat_port_be: 61000u16.to_be(),
            expires: 1100,
            created: 900,
            fwd_flags: flags,
            rev_flags: flags,
            changed_ms: 0,
        };
        let old = CtEntry {
            snat_port_be: 0,
            expires: 950,
            ..ct
        };
        let rows = flows(&c, &[(key, ct), (key, old)], 1000);
        assert_eq!(rows[0].backend.to_string(), "10.0.0.2:53");
        assert_eq!(rows[0].snat.unwrap().to_string(), "192.0.2.1:61000");
        assert_eq!(rows[0].service, "prod/edge");
        assert_eq!(
            (rows[0].state.as_str(), rows[0].age_s, rows[0].expires_in_s),
            ("established", 100, 100)
        );
        assert_eq!((rows[1].state.as_str(), rows[1].snat), ("expired", None));
        assert!(flows_table(&rows).contains("expired"));
    }

    #[test]
    fn backends_count_their_slots_and_json_is_stable() {
        let rows = backends(&contents());
        assert_eq!(rows.iter().map(|r| r.slots).collect::<Vec<_>>(), [1, 1, 1]);
        let json = serde_json::to_value(service_detail(&contents(), "prod/web")).unwrap();
        assert_eq!(json[0]["frontend"], "[fd00::1]:80/TCP");
        assert_eq!(json[0]["slots"][0]["backend"], "[fd00::5]:8080");
    }

    #[test]
    fn capacity_shows_each_maps_fill_and_flag() {
        use lb_common::maps;
        let mut c = contents();
        c.tables.insert(0, vec![1; 251]);
        c.tables.insert(251, vec![2; 509]);
        let caps = Capacities {
            services: 4,
            slots: 10,
            backends: 8,
            affinity_match: 10,
            external: 10,
            external_ids: 4,
            table_entries: 1000,
            ranges: 5,
            external_match: 10,
        };
        let rows = capacity(&c, &caps, &[(maps::CONNTRACK, 3, 12)]);
        let of = |m: &str| rows.iter().find(|r| r.map == m).unwrap().clone();
        assert_eq!(of(maps::SERVICES).entries, c.services.len() as u64);
        assert_eq!(of(maps::SERVICES).capacity, 4);
        let rings = of(maps::RINGS);
        assert_eq!((rings.entries, rings.fill_percent), (760, 76.0));
        assert_eq!(rings.flag, "--maglev-table-entries");
        // A changed table is written beside the one it replaces: room for the largest.
        assert_eq!(rings.needed, 760 + 509);
        let largest = c
            .services
            .values()
            .map(|v| u64::from(v.count))
            .max()
            .unwrap();
        assert_eq!(of(maps::SLOTS).needed, c.slots.len() as u64 + largest);
        assert_eq!(of(maps::BACKENDS).needed, c.backends.len() as u64);
        let ct = of(maps::CONNTRACK);
        assert_eq!((ct.fill_percent, ct.flag.as_str()), (25.0, "--max-flows"));
        let text = capacity_table(&rows);
        assert!(
            text.contains("lb_ring_v2") && text.contains("76.0%"),
            "{text}"
        );
    }
}
