//! The agent: load or adopt the maps, write the first complete sync, only then attach this
//! build's programs (replacing a previous agent's in place), and keep the maps equal to what
//! the source says until stopped. Stopping leaves everything programmed: the pinned links and
//! maps keep serving, and the next agent adopts them.
//!
//! Attaching after the first sync is what makes upgrades gapless: a build with a new map
//! layout starts with empty maps, and until they hold every service the previous programs
//! keep serving from the previous maps, however long the API server takes to answer.

pub mod config;
pub mod events;
pub mod health;
pub mod healthcheck;
mod kernel_log;
pub mod metrics;
pub mod netdev;
mod network;
pub mod privileges;
pub mod sockets;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use lb_common::{ServiceKey, proto};

use self::{
    config::AgentArgs,
    events::Events,
    health::Health,
    healthcheck::HealthCheckServers,
    kernel_log::{KernelLog, log_kernel_decisions},
    metrics::{Metrics, Published},
    network::Network,
};
use crate::{
    addr::{frontend_string, to_addr6},
    datapath::{Datapath, DatapathError, conntrack},
    k8s::ObjectRef,
    k8s::{
        source::{self, SourceError},
        store::{Store, Update},
    },
    loader::{
        self, LoadError, Loaded, PinLayout,
        host::{self, HostError},
    },
    reconcile::{Reconciler, SyncReport},
};

/// How soon failed writes are retried.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How often the node's addresses and devices are looked at again.
const NETWORK_POLL: Duration = Duration::from_secs(2);
/// How often the agent looks whether the grace period of what it switched away from has
/// ended (one lasts some milliseconds).
const GRACE_POLL: Duration = Duration::from_millis(5);
/// A sync of at least this many source updates (a relist, a burst) gives freed heap back.
const TRIM_AFTER_UPDATES: usize = 64;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The source ended, which it does not do while the agent runs.
    #[error("the source stopped")]
    SourceStopped,
    /// A flag value it cannot use.
    #[error(transparent)]
    Flag(#[from] config::FlagError),
    /// The host lacks something.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Loading, attaching or cleaning up failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The maps could not be read.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The source failed.
    #[error("source: {0}")]
    Source(#[from] SourceError),
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signal(std::io::Error),
}

/// Runs the agent with these arguments.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    args.validate()?;
    let layout = PinLayout::new(&args.pin_dir);
    if args.cleanup {
        let done = loader::cleanup(&layout)?;
        let socket = health::explain_socket(layout.root(), args.explain_socket.as_deref());
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                warn!(path = %socket.display(), error = %e, "cannot remove the explain socket");
            }
            _ => {}
        }
        info!(links = done.links, maps = done.maps, dir = %layout.root().display(), "cleaned up: programs detached, maps removed");
        return Ok(());
    }
    let given = args.source.as_deref().unwrap_or_default();
    let source = source::from_arg(given, args.api())
        .map_err(|reason| config::FlagError::new("--source", given, reason))?;
    if host::ensure_bpffs(&args.bpffs)? {
        warn!(path = %args.bpffs.display(), "mounted the BPF filesystem: none was there. In a \
              container, this mount is the container's own and the pins go with it, so a \
              restarted agent starts afresh: mount bpffs on the host (systemd does at boot)");
    }
    let cgroup = match &args.cgroup {
        Some(path) => path.clone(),
        None => host::cgroup2_root()?,
    };
    host::check_cgroup2(&cgroup)?;

    let snat_ports = args.snat_range()?;
    let settings = loader::Settings {
        snat_ports,
        debug: args.kernel_debug,
        ct_timeouts: args.ct_timeouts(),
        clock_offset: 0,
    };
    let mut loaded = Loaded::load_with(&layout, &args.map_sizes(), &settings)?;
    // Loading was the last thing that needed more: before any other thread exists (the
    // source's), limit the agent to what it needs from now on.
    match privileges::limit(&privileges::RUNTIME) {
        Ok(l) => info!(dropped = ?l.dropped, kept = ?l.kept, "start-up done: capabilities limited"),
        Err(e) => warn!(error = %e, "cannot drop the start-up capabilities"),
    }
    if args.kernel_debug {
        let logger = loaded.kernel_log(KernelLog)?;
        tokio::spawn(log_kernel_decisions(logger));
        info!("kernel debug logging on: every decision of the programs is logged");
    }
    let mut reconciler = Reconciler::new(loaded.datapath()?, args.limits())?;
    reconciler.set_namespace_share(args.namespace_share);
    let c = reconciler.contents();
    info!(
        frontends = c.services.len(), backends = c.backends.len(),
        capacity = ?reconciler.datapath().capacities(), pins = %layout.root().display(),
        "datapath ready (existing entries adopted)"
    );
    if let Some(settings) = source.api()
        && let Some(api) = source::kubernetes::api_address(settings).await
    {
        info!(%api, "the API server address is protected from losing every backend");
        reconciler.protect_api(ServiceKey::new(
            to_addr6(api.ip()),
            api.port().to_be(),
            proto::TCP,
        ));
    }
    if let Some(local) = netdev::local_port_range()
        && netdev::overlaps(local, snat_ports)
    {
        warn!(snat_ports = ?snat_ports, ip_local_port_range = ?local,
              "the SNAT ports overlap the kernel's ephemeral ports: replies to local connections \
               using them may be taken for replies of north-south flows; change --snat-ports or \
               net.ipv4.ip_local_port_range");
    }
    let mut network = Network::new(&args, &loaded)?;

    let health = Health::new(Duration::from_secs(args.stale_after));
    let metrics = Arc::new(Metrics::new(Some(layout.clone())));
    metrics.source_up(true);
    metrics.publish(Published::of(
        reconciler.contents(),
        &reconciler.datapath().capacities(),
    ));
    let (explainer, mut explain_rx) = mpsc::channel::<health::ExplainRequest>(8);
    if let Some(addr) = args.healthz()? {
        let health = health.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve_health(addr, health).await {
                error!(%addr, error = %e, "the health endpoint failed");
            }
        });
    }
    if let Some(addr) = args.metrics()? {
        let (health, metrics) = (health.clone(), metrics.clone());
        tokio::spawn(async move {
            if let Err(e) = health::serve_metrics(addr, health, metrics).await {
                error!(%addr, error = %e, "the metrics endpoint failed");
            }
        });
    }
    let socket = health::explain_socket(layout.root(), args.explain_socket.as_deref());
    tokio::spawn(async move {
        if let Err(e) = health::serve_explain(socket.clone(), explainer).await {
            error!(path = %socket.display(), error = %e, "the explain endpoint failed");
        }
    });
    let events = match source.api() {
        Some(settings) => match source::kubernetes::client(settings).await {
            Ok(client) => Some(Events::start(client, args.node_name.clone())),
            Err(e) => {
                warn!(error = %e, "no Kubernetes Events on unprogrammable services");
                None
            }
        },
        None => None,
    };
    let (tx, mut rx) = mpsc::channel(64);
    info!(source = source.describe(), node = ?args.node_name, "starting source");
    let up: source::SourceUp = {
        let (health, metrics) = (health.clone(), metrics.clone());
        Arc::new(move |up| {
            health.source_up(up);
            metrics.source_up(up);
        })
    };
    let mut source_task = tokio::spawn(source.run(tx, up));
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut store = Store::new(args.node_name.clone());
    store.set_external_ip_cidrs(args.external_ip_cidrs()?);
    let mut out = Outputs {
        events,
        layout: layout.clone(),
        netns_dirs: args.netns_dirs(),
        health_checks: HealthCheckServers::new(health.clone()),
        health,
        metrics,
        rejected_total: BTreeMap::new(),
    };
    let mut poll = tokio::time::interval(NETWORK_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Nothing is synced before the source's first complete snapshot: the first sync removes
    // what no service claims.
    let mut have_snapshot = false;
    let mut synced = false;
    let mut dirty = BTreeSet::new();
    let mut retire_at = tokio::time::Instant::now();
    let mut sweeps = Sweeps::new(
        &layout,
        Duration::from_secs(u64::from(args.conntrack_gc_interval)),
    );

    loop {
        tokio::select! {
            received = rx.recv() => {
                let Some(first) = received else {
                    return match (&mut source_task).await {
                        Ok(Err(e)) => Err(e.into()),
                        _ => Err(AgentError::SourceStopped),
                    };
                };
                // Coalesce whatever else is already queued into this sync.
                let oldest = first.at;
                let mut updates = 1;
                let mut next = Some(first);
                while let Some(stamped) = next {
                    have_snapshot |= matches!(stamped.update, Update::Snapshot(_));
                    dirty.extend(store.update(stamped.update));
                    next = rx.try_recv().ok();
                    updates += usize::from(next.is_some());
                }
                out.metrics.received(updates);
                out.health.node_deleting(store.node_deleting());
                if !have_snapshot {
                    continue;
                }
                out.health.received(oldest);
                // The first sync already knows the node's addresses.
                let mut first_addrs = None;
                if !synced && let Some((changed, addrs)) = network.addresses(&mut store) {
                    dirty.extend(changed);
                    first_addrs = Some(addrs);
                }
                let services = dirty.len();
                let report = out.sync(&mut reconciler, &store, std::mem::take(&mut dirty), Some(oldest));
                if !synced {
                    // Only now do this build's programs replace the running ones: until the
                    // maps they read hold every service, the previous programs keep serving
                    // from theirs (an upgrade to a new map layout has no gap).
                    start_serving(&mut loaded, &cgroup, &layout)?;
                    if let Some(addrs) = &first_addrs {
                        network.attach_devices(addrs, &store, &mut loaded);
                    }
                    out.health.serving();
                }
                let c = reconciler.contents();
                let latency_us = oldest.elapsed().as_micros() as u64;
                if !synced || updates >= TRIM_AFTER_UPDATES {
                    trim_heap();
                }
                if report.frontends_changed > 0 {
                    sweeps.soon();
                }
                if !synced {
                    info!(frontends = c.services.len(), backends = c.backends.len(), writes = report.writes, latency_us, "initial sync done");
                    synced = true;
                } else if report.writes > 0 {
                    info!(updates, services, frontends_changed = report.frontends_changed, writes = report.writes, latency_us, "synced");
                } else {
                    debug!(updates, services, latency_us, "synced, nothing to write");
                }
            }
            // What the syncs switched away from is deleted once its grace period (waited
            // for on a thread of its own) has ended: looked at every GRACE_POLL.
            () = tokio::time::sleep_until(retire_at), if synced && reconciler.has_pending() => {
                let failed = out.retire(&mut reconciler, &store);
                retire_at = tokio::time::Instant::now() + if failed { RETRY_AFTER } else { GRACE_POLL };
            }
            () = tokio::time::sleep(RETRY_AFTER), if reconciler.needs_retry() => {
                let report = out.sync(&mut reconciler, &store, BTreeSet::new(), None);
                info!(writes = report.writes, "retried failed writes");
            }
            _ = poll.tick(), if synced => {
                let changed = network.poll(&mut store, &mut loaded);
                if !changed.is_empty() {
                    let report = out.sync(&mut reconciler, &store, changed, None);
                    info!(writes = report.writes, addresses = ?store.node().addresses,
                          "node addresses changed; node ports follow");
                }
            }
            // Expired flows (and UDP flows of deleted endpoints) are swept off the sync path.
            () = tokio::time::sleep_until(sweeps.at), if synced && sweeps.idle() => {
                sweeps.start(reconciler.flow_endpoints());
            }
            done = sweeps.finished() => sweeps.done(done, &out.metrics),
            Some((question, reply)) = explain_rx.recv() => {
                let answer = match question {
                    health::Question::Explain(service) => explanation(&store, &service),
                    health::Question::Shares => serde_json::to_string(&reconciler.shares().rows()).ok(),
                };
                let _gone = reply.send(answer);
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    source_task.abort();
    info!("stopping; the datapath stays programmed and the next agent adopts it");
    Ok(())
}

/// The conntrack sweeps: one at a time, on a blocking thread, at the interval
/// [`conntrack::next_interval`] adapts.
struct Sweeps {
    /// The sweeper, while no sweep runs (`None` also when the maps could not be opened).
    sweeper: Option<conntrack::Sweeper>,
    running: Option<
        tokio::task::JoinHandle<(conntrack::Sweeper, std::io::Result<conntrack::SweepReport>)>,
    >,
    /// When the next sweep is due.
    at: tokio::time::Instant,
    interval: Duration,
    max: Duration,
    last: tokio::time::Instant,
}

impl Sweeps {
    fn new(layout: &PinLayout, max: Duration) -> Self {
        let sweeper = match conntrack::Sweeper::open(layout, 0) {
            Ok(s) => Some(s),
            Err(e) => {
                error!(error = %e, "cannot open the conntrack maps: expired flows are not swept (the kernel still ignores them)");
                None
            }
        };
        let now = tokio::time::Instant::now();
        Self {
            sweeper,
            running: None,
            at: now + conntrack::MIN_INTERVAL,
            interval: max.max(conntrack::MIN_INTERVAL),
            max,
            last: now,
        }
    }

    fn idle(&self) -> bool {
        self.sweeper.is_some() && self.running.is_none()
    }

    /// A sweep as soon as allowed (at most one per [`conntrack::MIN_INTERVAL`]): services
    /// changed, and UDP flows of deleted endpoints should move.
    fn soon(&mut self) {
        self.at = self.at.min(self.last + conntrack::MIN_INTERVAL);
    }

    fn start(&mut self, endpoints: BTreeMap<u32, BTreeSet<lb_common::Endpoint>>) {
        let Some(mut sweeper) = self.sweeper.take() else {
            return;
        };
        let owners = conntrack::Owners::now(endpoints, sweeper.clock_offset());
        self.last = tokio::time::Instant::now();
        self.running = Some(tokio::task::spawn_blocking(move || {
            let r = sweeper.sweep(&owners);
            (sweeper, r)
        }));
    }

    /// The running sweep's end (pending while none runs).
    async fn finished(
        &mut self,
    ) -> Result<(conntrack::Sweeper, std::io::Result<conntrack::SweepReport>), tokio::task::JoinError>
    {
        match self.running.as_mut() {
            Some(handle) => handle.await,
            None => std::future::pending().await,
        }
    }

    fn done(
        &mut self,
        result: Result<
            (conntrack::Sweeper, std::io::Result<conntrack::SweepReport>),
            tokio::task::JoinError,
        >,
        metrics: &Metrics,
    ) {
        self.running = None;
        let now = tokio::time::Instant::now();
        match result {
            Ok((sweeper, Ok(r))) => {
                metrics.swept(&r);
                let removed = r.removed_total();
                self.interval =
                    conntrack::next_interval(self.interval, removed, sweeper.capacity(), self.max);
                if removed > 0 {
                    debug!(
                        scanned = r.scanned,
                        removed,
                        expired = r.removed[0],
                        service_gone = r.removed[1],
                        endpoint_gone = r.removed[2],
                        orphans = r.orphans_removed,
                        snat_ports = r.snat_ports,
                        took_ms = r.took.as_millis() as u64,
                        next_s = self.interval.as_secs(),
                        "conntrack swept"
                    );
                }
                self.sweeper = Some(sweeper);
            }
            Ok((sweeper, Err(e))) => {
                warn!(error = %e, "conntrack sweep failed; retrying");
                self.sweeper = Some(sweeper);
            }
            Err(e) => error!(error = %e, "the conntrack sweep panicked; no more sweeps"),
        }
        self.at = now + self.interval;
    }
}

/// Why each endpoint of `service` does or does not get new connections on this node, as
/// JSON; `None` if the store has no such service.
fn explanation(store: &Store, service: &ObjectRef) -> Option<String> {
    let svc = store.service(service)?;
    let (ports, rejected) = match crate::model::explain(svc, store.slices_of(service), store.node())
    {
        Ok(ports) => (ports, None),
        Err(rejection) => (Vec::new(), Some(rejection.to_string())),
    };
    let e = crate::model::ServiceExplanation {
        service: service.to_string(),
        rejected,
        ports,
    };
    serde_json::to_string(&e).ok()
}

/// Attaches this build's socket programs to `cgroup` (replacing a previous agent's in place)
/// and removes the pins of maps of an older layout.
fn start_serving(loaded: &mut Loaded, cgroup: &Path, layout: &PinLayout) -> Result<(), AgentError> {
    loaded.attach(cgroup)?;
    info!(cgroup = %cgroup.display(), programs = loader::PROGRAMS.len() + 1, "programs attached");
    match loader::remove_stale_map_pins(layout) {
        Ok(removed) if !removed.is_empty() => {
            info!(maps = ?removed, "removed the pins of maps of an older layout");
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot remove the pins of maps of an older layout"),
    }
    Ok(())
}

/// Where the results of a sync go: logs, the health endpoints and check ports, metrics, and
/// the destruction of stale UDP sockets.
struct Outputs {
    layout: PinLayout,
    /// Where pinned network namespaces are looked for (stale UDP sockets).
    netns_dirs: Vec<PathBuf>,
    health: Health,
    health_checks: HealthCheckServers,
    metrics: Arc<Metrics>,
    rejected_total: BTreeMap<&'static str, u64>,
    /// Events on services that cannot be programmed (with the Kubernetes source).
    events: Option<Events>,
}

impl Outputs {
    /// Syncs the services `dirty` (and whatever needs a retry), then reports the result
    /// everywhere; `oldest` is when the oldest source update it covers was received.
    fn sync<D: Datapath>(
        &mut self,
        reconciler: &mut Reconciler<D>,
        store: &Store,
        dirty: BTreeSet<ObjectRef>,
        oldest: Option<Instant>,
    ) -> SyncReport {
        let started = Instant::now();
        let report = reconciler.sync(store, dirty);
        let duration = started.elapsed();
        self.metrics
            .synced(&report, duration, oldest.map(|at| at.elapsed()));
        self.report(reconciler, store, &report);
        report
    }

    /// Deletes what the syncs switched away from, after a grace period, and reports it;
    /// whether something failed.
    fn retire<D: Datapath>(&mut self, reconciler: &mut Reconciler<D>, store: &Store) -> bool {
        let started = Instant::now();
        let report = reconciler.retire();
        if report.writes == 0 && report.errors.is_empty() && report.full.is_empty() {
            // Nothing whose grace period has ended yet.
            return false;
        }
        self.metrics.retired(&report, started.elapsed());
        self.report(reconciler, store, &report);
        debug!(
            writes = report.writes,
            took_us = started.elapsed().as_micros() as u64,
            "deleted what the syncs switched away from"
        );
        !report.errors.is_empty()
    }

    /// Reports what a sync or retirement did everywhere.
    fn report<D: Datapath>(
        &mut self,
        reconciler: &Reconciler<D>,
        store: &Store,
        report: &SyncReport,
    ) {
        log_report(report, &mut self.rejected_total);
        if let Some(events) = &mut self.events {
            let dropped = events.dropped();
            let published = events.report(report, store);
            self.metrics
                .events(published, events.dropped().saturating_sub(dropped));
        }
        destroy_stale_udp(&self.layout, &self.netns_dirs, report);
        self.health_checks.update(reconciler.health_checks());
        self.metrics.share_waiting(reconciler.shares().waiting());
        if !reconciler.needs_retry() {
            self.health.programmed();
        }
        self.metrics.publish(Published::of(
            reconciler.contents(),
            &reconciler.datapath().capacities(),
        ));
    }
}

/// Gives the heap freed by a large sync back to the system. glibc keeps freed memory in its
/// arenas, so without this the decoding of a big cluster's first list would stay in the
/// agent's resident memory for good.
fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Destroys, off the sync path, the connected UDP sockets pointed at backends that left.
fn destroy_stale_udp(layout: &PinLayout, netns_dirs: &[PathBuf], report: &SyncReport) {
    if report.stale_udp.is_empty() {
        return;
    }
    let (layout, stale) = (layout.clone(), report.stale_udp.clone());
    let dirs = netns_dirs.to_vec();
    tokio::task::spawn_blocking(
        move || match sockets::destroy_stale(&layout, &dirs, &stale) {
            Ok(done) => {
                info!(
                    backends = stale.len(),
                    namespaces = done.namespaces,
                    destroyed = done.sockets,
                    "destroyed connected UDP sockets of removed backends"
                );
                for e in done.errors {
                    warn!(error = e, "could not look for stale UDP sockets");
                }
            }
            Err(e) => warn!(error = %e, "could not look for stale UDP sockets"),
        },
    );
}

fn log_report(report: &SyncReport, rejected_total: &mut BTreeMap<&'static str, u64>) {
    for (service, rejection) in &report.rejected {
        let total = rejected_total.entry(rejection.reason()).or_default();
        *total += 1;
        warn!(%service, reason = rejection.reason(), error = %rejection, rejected_total = *total,
              "service not programmed; what it had before, if anything, is kept");
    }
    for (service, note) in &report.notes {
        info!(%service, "{note}");
    }
    for c in &report.conflicts {
        warn!(frontend = frontend_string(&c.frontend), programmed_by = %c.winner, ignored = %c.loser,
              "two services claim one frontend; a service's own cluster IP or node port wins, then the oldest service");
    }
    for (service, why) in report.refused.iter().chain(&report.limited) {
        warn!(%service, "{why}");
    }
    for f in &report.full {
        error!(service = %f.service, frontend = frontend_string(&f.frontend), map = f.map, capacity = f.capacity,
               "map full: the change is refused and the frontend keeps what it had; raise the capacity");
    }
    for e in &report.errors {
        error!(error = %e, "datapath write failed; retrying in {RETRY_AFTER:?}");
    }
}
