//! The agent's Prometheus metrics, served at `/metrics` by [`crate::agent::health`].
//!
//! Two kinds:
//! - The agent's own, updated as it works: sync duration and event-to-datapath latency
//!   histograms, source updates, rejected services by reason, refused changes by full map,
//!   failed writes and frontend conflicts.
//! - The datapath's, read from the pinned maps at each scrape (as `lbctl` reads them): the
//!   per-CPU counters of every hook outcome and every drop reason, per-service packet, byte,
//!   flow and drop counters of north-south services, and every map's entries against its
//!   capacity (the maps the agent writes as of its last sync, the LRU maps the programs write
//!   counted by walking their keys).
//!
//! Every name starts with `lb_`.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{
    addr::{frontend_string, to_socket_addr},
    cli::{self, CapacityRow},
    datapath::{Capacities, Contents, bpf},
    loader::PinLayout,
    reconcile::SyncReport,
};
use lb_common::{
    ServiceInfo,
    external::ExternalCounters,
    stats::{self, SocketCounters},
};

/// The datapath counters that count dropped or refused traffic, with their reason label.
const DROPS: [(u32, &str); 7] = [
    (stats::REFUSED_NO_BACKEND, "socket_no_backend"),
    (stats::XDP_DROP_NO_BACKEND, "no_backend"),
    (stats::XDP_REJECT_NO_BACKEND, "rejected_no_backend"),
    (stats::XDP_TOO_BIG, "too_big"),
    (stats::XDP_DROP_SOURCE_RANGE, "source_range"),
    (stats::XDP_DROP_NO_SNAT_PORT, "no_snat_port"),
    (stats::XDP_DROP_NO_FLOW, "no_flow"),
];

/// What the agent publishes after each sync for the scrape to report (a few numbers: the
/// names of services are read from the maps at the scrape, so a sync costs no more).
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Fill of the maps the agent writes.
    pub capacity: Vec<CapacityRow>,
    /// Socket-level (ClusterIP) frontends programmed.
    pub frontends: u64,
    /// North-south frontends programmed.
    pub external_frontends: u64,
    /// Backends programmed.
    pub backends: u64,
}

impl Published {
    /// What the maps hold, as the mirror `c` says, with capacities `caps`.
    pub fn of(c: &Contents, caps: &Capacities) -> Self {
        Self {
            capacity: cli::capacity(c, caps, &[]),
            frontends: c.services.len() as u64,
            external_frontends: c.external.len() as u64,
            backends: c.backends.len() as u64,
        }
    }
}

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    retire_duration: Histogram,
    event_latency: Histogram,
    updates: Counter,
    syncs: Counter,
    writes: Counter,
    rejected: Family<[(&'static str, &'static str); 1], Counter>,
    map_full: Family<[(&'static str, &'static str); 1], Counter>,
    write_errors: Counter,
    conflicts: Counter,
    external_ips_refused: Counter,
    backends_limited: Counter,
    share_waiting: Gauge,
    source_up: Gauge,
    events: Counter,
    events_dropped: Counter,
    conntrack_sweeps: Counter,
    conntrack_sweep_duration: Histogram,
    conntrack_removed: Family<[(&'static str, &'static str); 1], Counter>,
    conntrack_entries: Family<[(&'static str, &'static str); 1], Gauge>,
    snat_ports: Gauge,
    snat_ports_busiest: Gauge,
    published: Arc<Mutex<Published>>,
}

impl Metrics {
    /// Metrics whose datapath part reads the maps pinned under `layout` (`None`: the agent's
    /// own metrics only).
    pub fn new(layout: Option<PinLayout>) -> Self {
        let mut registry = Registry::with_prefix("lb");
        let seconds = || Histogram::new(exponential_buckets(0.000_01, 2.0, 22));
        let m = Self {
            sync_duration: seconds(),
            retire_duration: seconds(),
            event_latency: seconds(),
            updates: Counter::default(),
            syncs: Counter::default(),
            writes: Counter::default(),
            rejected: Family::default(),
            map_full: Family::default(),
            write_errors: Counter::default(),
            conflicts: Counter::default(),
            external_ips_refused: Counter::default(),
            backends_limited: Counter::default(),
            share_waiting: Gauge::default(),
            source_up: Gauge::default(),
            events: Counter::default(),
            events_dropped: Counter::default(),
            conntrack_sweeps: Counter::default(),
            conntrack_sweep_duration: seconds(),
            conntrack_removed: Family::default(),
            conntrack_entries: Family::default(),
            snat_ports: Gauge::default(),
            snat_ports_busiest: Gauge::default(),
            published: Arc::default(),
            registry: Registry::default(),
        };
        registry.register_with_unit(
            "sync_duration",
            "Time to compute and write one sync",
            Unit::Seconds,
            m.sync_duration.clone(),
        );
        registry.register_with_unit(
            "retire_duration",
            "Time to delete what syncs switched away from, once its grace period has ended",
            Unit::Seconds,
            m.retire_duration.clone(),
        );
        registry.register_with_unit(
            "event_to_datapath",
            "Time from the source receiving an update to the last map write it caused",
            Unit::Seconds,
            m.event_latency.clone(),
        );
        registry.register(
            "source_updates",
            "Updates received from the source (objects added, changed, deleted; lists)",
            m.updates.clone(),
        );
        registry.register("syncs", "Syncs run", m.syncs.clone());
        registry.register("map_writes", "Map writes performed", m.writes.clone());
        registry.register(
            "rejected_services",
            "Services (or service ports) not programmed, by reason; what they had is kept",
            m.rejected.clone(),
        );
        registry.register(
            "map_full",
            "Frontend changes refused because a map was full, by map",
            m.map_full.clone(),
        );
        registry.register(
            "map_write_errors",
            "Map writes that failed (retried)",
            m.write_errors.clone(),
        );
        registry.register(
            "frontend_conflicts",
            "Frontend claims lost to another service (its own cluster IP or node port wins, \
             then the oldest service)",
            m.conflicts.clone(),
        );
        registry.register(
            "external_ips_refused",
            "External IPs not honoured (an address of this node, outside --external-ip-cidrs, \
             or a special address)",
            m.external_ips_refused.clone(),
        );
        registry.register(
            "backends_limited",
            "Service ports over --max-backends-per-service, served by a stable subset (per sync)",
            m.backends_limited.clone(),
        );
        registry.register(
            "namespace_share_waiting",
            "Services refused because their namespace holds its share of a map \
             (--namespace-share), waiting for it to free room",
            m.share_waiting.clone(),
        );
        registry.register(
            "source_up",
            "1 while the source reaches its objects, 0 during an outage",
            m.source_up.clone(),
        );
        registry.register(
            "kubernetes_events",
            "Warning Events published on Services that could not be programmed",
            m.events.clone(),
        );
        registry.register(
            "kubernetes_events_dropped",
            "Warnings not published as Events (rate limit or full queue)",
            m.events_dropped.clone(),
        );
        registry.register(
            "conntrack_sweeps",
            "Sweeps of the north-south conntrack map",
            m.conntrack_sweeps.clone(),
        );
        registry.register_with_unit(
            "conntrack_sweep_duration",
            "Time one sweep of the north-south conntrack map took",
            Unit::Seconds,
            m.conntrack_sweep_duration.clone(),
        );
        registry.register(
            "conntrack_removed",
            "North-south conntrack entries removed by the sweep, by reason (expired, \
             service_gone, endpoint_gone: UDP flows of a deleted endpoint; orphan: reverse \
             entries of no flow)",
            m.conntrack_removed.clone(),
        );
        registry.register(
            "conntrack_entries",
            "North-south flows by state, as of the last sweep",
            m.conntrack_entries.clone(),
        );
        registry.register(
            "snat_ports_in_use",
            "SNAT ports held by north-south flows, as of the last sweep",
            m.snat_ports.clone(),
        );
        registry.register(
            "snat_ports_busiest",
            "Most SNAT ports held towards one backend from one node address (each such pair \
             has the whole --snat-ports range; xdp_drop_no_snat_port counts exhaustion)",
            m.snat_ports_busiest.clone(),
        );
        if let Some(layout) = layout {
            registry.register_collector(Box::new(DatapathCollector {
                layout,
                published: m.published.clone(),
                last: Mutex::new(None),
            }));
        }
        Self { registry, ..m }
    }

    /// `updates` source updates were received.
    pub fn received(&self, updates: usize) {
        self.updates.inc_by(updates as u64);
    }

    /// A sync took `duration` and its last write came `latency` after the oldest update it
    /// covers (`None`: a retry or a poll, with no source update).
    pub fn synced(
        &self,
        report: &SyncReport,
        duration: std::time::Duration,
        latency: Option<std::time::Duration>,
    ) {
        self.syncs.inc();
        self.sync_duration.observe(duration.as_secs_f64());
        if let Some(latency) = latency {
            self.event_latency.observe(latency.as_secs_f64());
        }
        self.count(report);
    }

    /// A retirement (see [`crate::reconcile::Reconciler::retire`]) reported `report` after
    /// `duration`.
    pub fn retired(&self, report: &SyncReport, duration: std::time::Duration) {
        self.retire_duration.observe(duration.as_secs_f64());
        self.count(report);
    }

    /// The writes, refusals and failures of a sync or retirement.
    fn count(&self, report: &SyncReport) {
        self.writes.inc_by(report.writes as u64);
        for (_, rejection) in &report.rejected {
            self.rejected
                .get_or_create(&[("reason", rejection.reason())])
                .inc();
        }
        for full in &report.full {
            self.map_full.get_or_create(&[("map", full.map)]).inc();
        }
        self.write_errors.inc_by(report.errors.len() as u64);
        self.conflicts.inc_by(report.conflicts.len() as u64);
        self.external_ips_refused
            .inc_by(report.refused.len() as u64);
        self.backends_limited.inc_by(report.limited.len() as u64);
    }

    /// `n` services wait for their namespace to free room in its share.
    pub fn share_waiting(&self, n: usize) {
        self.share_waiting.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `published` Events were queued and `dropped` more warnings were not.
    pub fn events(&self, published: usize, dropped: u64) {
        self.events.inc_by(published as u64);
        self.events_dropped.inc_by(dropped);
    }

    /// A conntrack sweep reported `r`.
    pub fn swept(&self, r: &crate::datapath::conntrack::SweepReport) {
        use crate::datapath::conntrack::Removal;
        self.conntrack_sweeps.inc();
        self.conntrack_sweep_duration.observe(r.took.as_secs_f64());
        for (why, n) in Removal::ALL.iter().zip(r.removed) {
            self.conntrack_removed
                .get_or_create(&[("reason", why.label())])
                .inc_by(n);
        }
        self.conntrack_removed
            .get_or_create(&[("reason", "orphan")])
            .inc_by(r.orphans_removed);
        for (state, n) in lb_common::external::CT_STATE_NAMES.iter().zip(r.by_state) {
            self.conntrack_entries
                .get_or_create(&[("state", state)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.snat_ports
            .set(i64::try_from(r.snat_ports).unwrap_or(i64::MAX));
        self.snat_ports_busiest
            .set(i64::try_from(r.snat_ports_busiest).unwrap_or(i64::MAX));
    }

    /// Whether the source reaches its objects.
    pub fn source_up(&self, up: bool) {
        self.source_up.set(i64::from(up));
    }

    /// What the maps hold after a sync.
    pub fn publish(&self, published: Published) {
        *self
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = published;
    }

    /// Every metric in the Prometheus text format (reads the maps: blocking).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Least time between two readings of the maps: a scrape within it reports the last one,
/// so a storm of scrapes walks the maps once a second at most (the agent's own metrics are
/// always current).
pub const READ_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Reports the datapath's counters and map fill, read from the maps at most once per
/// [`READ_EVERY`].
#[derive(Debug)]
struct DatapathCollector {
    layout: PinLayout,
    published: Arc<Mutex<Published>>,
    /// The last reading and when it was taken.
    last: Mutex<Option<(std::time::Instant, Arc<Reading>)>>,
}

/// What one scrape reads from the maps (each part empty when its maps are missing, as for
/// an agent that has not loaded yet).
#[derive(Debug, Default)]
struct Reading {
    totals: Vec<u64>,
    lru: Vec<(&'static str, u64, u64)>,
    services: BTreeMap<u32, ServiceInfo>,
    counters: BTreeMap<u32, ExternalCounters>,
    labels: Option<bpf::SocketLabels>,
    socket: BTreeMap<u32, SocketCounters>,
    per_backend: BTreeMap<u32, u64>,
}

impl Reading {
    fn of(layout: &PinLayout) -> Self {
        let services = bpf::read_ns_info(layout).unwrap_or_default();
        let ids: Vec<u32> = services.keys().copied().collect();
        let labels = bpf::read_socket_labels(layout).ok();
        let svc_ids: Vec<u32> = labels
            .iter()
            .flat_map(|l| l.frontends.iter().map(|(_, id, _)| *id))
            .collect();
        let be_ids: Vec<u32> = labels
            .iter()
            .flat_map(|l| l.backends.keys().copied())
            .collect();
        let (socket, per_backend) =
            bpf::read_socket_counters(layout, &svc_ids, &be_ids).unwrap_or_default();
        Self {
            totals: bpf::read_stats(layout).unwrap_or_default(),
            lru: bpf::lru_fill(layout).unwrap_or_default(),
            counters: bpf::read_ns_counters(layout, &ids).unwrap_or_default(),
            services,
            labels,
            socket,
            per_backend,
        }
    }
}

impl DatapathCollector {
    /// The last reading if taken less than [`READ_EVERY`] ago, else a new one (concurrent
    /// scrapes wait for it and share it).
    fn reading(&self) -> Arc<Reading> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, reading)) = last.as_ref()
            && at.elapsed() < READ_EVERY
        {
            return reading.clone();
        }
        let reading = Arc::new(Reading::of(&self.layout));
        *last = Some((std::time::Instant::now(), reading.clone()));
        reading
    }
}

/// Encodes a counter or gauge family: `(labels, value)` rows under one descriptor.
fn family<const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counter: bool,
    rows: impl IntoIterator<Item = ([(&'static str, String); N], u64)>,
) -> Result<(), std::fmt::Error> {
    let metric_type = if counter {
        ConstCounter::new(0u64).metric_type()
    } else {
        ConstGauge::new(0i64).metric_type()
    };
    let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in rows {
        let labelled = metric.encode_family(&labels)?;
        if counter {
            ConstCounter::new(value).encode(labelled)?;
        } else {
            ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(labelled)?;
        }
    }
    Ok(())
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let published = self
            .published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let reading = self.reading();
        let totals = &reading.totals;
        family(
            &mut encoder,
            "datapath_events",
            "Outcomes of the kernel programs, summed over CPUs (see lbctl stats)",
            true,
            stats::NAMES
                .iter()
                .zip(totals.iter())
                .map(|(name, v)| ([("event", (*name).to_owned())], *v)),
        )?;
        family(
            &mut encoder,
            "datapath_drops",
            "Connections refused and packets dropped by the kernel programs, by reason",
            true,
            DROPS.iter().filter_map(|(i, reason)| {
                totals
                    .get(*i as usize)
                    .map(|v| ([("reason", (*reason).to_owned())], *v))
            }),
        )?;
        let lru = &reading.lru;
        let fill = published
            .capacity
            .iter()
            .map(|r| (r.map.clone(), r.entries, r.capacity))
            .chain(lru.iter().map(|(m, e, c)| ((*m).to_owned(), *e, *c)));
        let fill: Vec<(String, u64, u64)> = fill.collect();
        family(
            &mut encoder,
            "map_entries",
            "Entries in each map",
            false,
            fill.iter().map(|(m, e, _)| ([("map", m.clone())], *e)),
        )?;
        family(
            &mut encoder,
            "map_capacity",
            "Capacity of each map",
            false,
            fill.iter().map(|(m, _, c)| ([("map", m.clone())], *c)),
        )?;
        family(
            &mut encoder,
            "frontends",
            "Frontends programmed: socket (cluster IPs) and north-south (node ports, \
             load-balancer and external IPs)",
            false,
            [
                ([("path", "socket".to_owned())], published.frontends),
                (
                    [("path", "north_south".to_owned())],
                    published.external_frontends,
                ),
            ],
        )?;
        family(
            &mut encoder,
            "backends",
            "Distinct backends programmed",
            false,
            [([], published.backends)],
        )?;
        let (services, counters) = (&reading.services, &reading.counters);
        let per_service = |f: fn(&ExternalCounters) -> u64| {
            services.iter().map(move |(id, info)| {
                let labels = [
                    ("namespace", info.namespace().unwrap_or("?").to_owned()),
                    ("service", info.name().unwrap_or("?").to_owned()),
                    ("port", info.port_name().unwrap_or_default().to_owned()),
                ];
                let value = counters.get(id).map(f).unwrap_or_default();
                (labels, value)
            })
        };
        // The socket path's frontends and backends.
        let labels = reading.labels.as_ref();
        let frontends = labels.map(|l| l.frontends.as_slice()).unwrap_or_default();
        let backends = labels.map(|l| &l.backends);
        let (socket, per_backend) = (&reading.socket, &reading.per_backend);
        let frontend_rows = |f: fn(&SocketCounters) -> u64| {
            frontends.iter().map(move |(key, id, info)| {
                let text = |g: fn(&ServiceInfo) -> Option<&str>| {
                    info.as_ref().and_then(g).unwrap_or("?").to_owned()
                };
                let labels = [
                    ("namespace", text(ServiceInfo::namespace)),
                    ("service", text(ServiceInfo::name)),
                    ("port", text(ServiceInfo::port_name)),
                    ("frontend", frontend_string(key)),
                ];
                (labels, socket.get(id).map(f).unwrap_or_default())
            })
        };
        family(
            &mut encoder,
            "service_connections",
            "Connections (and unconnected UDP datagrams) the socket hooks translated, per frontend",
            true,
            frontend_rows(|c| c.translated),
        )?;
        family(
            &mut encoder,
            "service_refused",
            "connect() and sendmsg() calls refused for want of a backend, per frontend",
            true,
            frontend_rows(|c| c.refused),
        )?;
        family(
            &mut encoder,
            "backend_connections",
            "Connections (and unconnected UDP datagrams) the socket hooks sent to each backend",
            true,
            backends.into_iter().flatten().map(|(id, ep)| {
                let labels = [("backend", to_socket_addr(ep).to_string())];
                (labels, per_backend.get(id).copied().unwrap_or_default())
            }),
        )?;
        for (name, help, f) in [
            (
                "service_packets",
                "North-south packets translated for the service, both directions",
                (|c: &ExternalCounters| c.packets) as fn(&ExternalCounters) -> u64,
            ),
            (
                "service_bytes",
                "Bytes of those packets (IP header on)",
                |c: &ExternalCounters| c.bytes,
            ),
            (
                "service_flows",
                "New north-south flows (connections) of the service",
                |c: &ExternalCounters| c.flows,
            ),
            (
                "service_drops",
                "North-south packets of the service dropped (no backend, source range, no SNAT port)",
                |c: &ExternalCounters| c.drops,
            ),
        ] {
            family(&mut encoder, name, help, true, per_service(f))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{k8s::ObjectRef, model::Rejection, reconcile::MapFull};
    use lb_common::ServiceKey;

    #[test]
    fn the_agent_metrics_count_what_syncs_report() {
        let m = Metrics::new(None);
        m.received(3);
        m.source_up(true);
        let report = SyncReport {
            writes: 7,
            rejected: vec![(
                ObjectRef::new("ns", "bad"),
                Rejection::InvalidIp {
                    what: "cluster IP",
                    value: "10.0.0.300".into(),
                },
            )],
            limited: vec![(ObjectRef::new("ns", "big"), "over the limit".into())],
            full: vec![MapFull {
                service: ObjectRef::new("ns", "big"),
                frontend: ServiceKey::new(
                    lb_common::Addr6::default(),
                    80u16.to_be(),
                    lb_common::proto::TCP,
                ),
                map: lb_common::maps::SLOTS,
                capacity: 1,
            }],
            ..SyncReport::default()
        };
        m.synced(
            &report,
            std::time::Duration::from_millis(2),
            Some(std::time::Duration::from_millis(3)),
        );
        let text = m.encode().unwrap();
        for line in [
            "lb_source_updates_total 3",
            "lb_syncs_total 1",
            "lb_map_writes_total 7",
            "lb_rejected_services_total{reason=\"invalid_ip\"} 1",
            "lb_backends_limited_total 1",
            "lb_map_full_total{map=\"lb_slot_v2\"} 1",
            "lb_source_up 1",
            "lb_sync_duration_seconds_count 1",
            "lb_event_to_datapath_seconds_sum 0.003",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}
