//! The agent: load or adopt the datapath, attach the programs, then keep the maps equal to
//! what the source says, until stopped. Stopping leaves everything programmed: the pinned
//! links and maps keep serving, and the next agent adopts them.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{debug, error, info, warn};

use lb_common::{ServiceKey, proto};

use crate::{
    addr::{frontend_string, to_addr6},
    config::AgentArgs,
    datapath::{Datapath, DatapathError},
    health::{self, Readiness},
    host::{self, HostError},
    loader::{self, LoadError, Loaded, PinLayout},
    reconcile::{Reconciler, SyncReport},
    sockets,
    source::{self, SourceError},
    store::{Store, Update},
};

/// How soon failed writes are retried.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A flag is wrong.
    #[error("{0}")]
    Config(String),
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
    args.validate().map_err(AgentError::Config)?;
    let layout = PinLayout::new(&args.pin_dir);
    if args.cleanup {
        let done = loader::cleanup(&layout)?;
        info!(links = done.links, maps = done.maps, dir = %layout.root().display(), "cleaned up: programs detached, maps removed");
        return Ok(());
    }
    let source = source::from_arg(args.source.as_deref().unwrap_or_default(), args.api())
        .map_err(AgentError::Config)?;
    if host::ensure_bpffs(&args.bpffs)? {
        info!(path = %args.bpffs.display(), "mounted the BPF filesystem");
    }
    let cgroup = match &args.cgroup {
        Some(path) => path.clone(),
        None => host::cgroup2_root()?,
    };
    host::check_cgroup2(&cgroup)?;

    let mut loaded = Loaded::load(&layout, &args.map_sizes())?;
    let mut reconciler = Reconciler::new(loaded.datapath()?, args.limits())?;
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
    loaded.attach(&cgroup)?;
    info!(cgroup = %cgroup.display(), programs = loader::PROGRAMS.len(), "programs attached");

    let ready = Readiness::default();
    if let Some(addr) = args.health().map_err(AgentError::Config)? {
        let ready = ready.clone();
        tokio::spawn(async move {
            if let Err(e) = health::serve(addr, ready).await {
                error!(%addr, error = %e, "the health endpoint failed");
            }
        });
    }
    let (tx, mut rx) = mpsc::channel(64);
    info!(source = source.describe(), node = ?args.node_name, "starting source");
    let mut source_task = tokio::spawn(source.run(tx));
    let mut sigterm = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    let mut store = Store::new(args.node_name.clone());
    let mut rejected_total: BTreeMap<&'static str, u64> = BTreeMap::new();
    // Nothing is synced before the source's first complete snapshot: the first sync removes
    // what no service claims.
    let mut have_snapshot = false;
    let mut synced = false;
    let mut dirty = BTreeSet::new();

    loop {
        tokio::select! {
            received = rx.recv() => {
                let Some(first) = received else {
                    return match (&mut source_task).await {
                        Ok(Err(e)) => Err(e.into()),
                        _ => Err(AgentError::Config("the source stopped".into())),
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
                if !have_snapshot {
                    continue;
                }
                let services = dirty.len();
                let report = reconciler.sync(&store, std::mem::take(&mut dirty));
                log_report(&report, &mut rejected_total);
                destroy_stale_udp(&layout, &report);
                if !reconciler.needs_retry() {
                    ready.set_ready();
                }
                let c = reconciler.contents();
                let latency_us = oldest.elapsed().as_micros() as u64;
                if !synced {
                    info!(frontends = c.services.len(), backends = c.backends.len(), writes = report.writes, latency_us, "initial sync done");
                    synced = true;
                } else if report.writes > 0 {
                    info!(updates, services, frontends_changed = report.frontends_changed, writes = report.writes, latency_us, "synced");
                } else {
                    debug!(updates, services, latency_us, "synced, nothing to write");
                }
            }
            () = tokio::time::sleep(RETRY_AFTER), if reconciler.needs_retry() => {
                let report = reconciler.sync(&store, BTreeSet::new());
                log_report(&report, &mut rejected_total);
                destroy_stale_udp(&layout, &report);
                if !reconciler.needs_retry() {
                    ready.set_ready();
                }
                info!(writes = report.writes, "retried failed writes");
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    source_task.abort();
    info!("stopping; the datapath stays programmed and the next agent adopts it");
    Ok(())
}

/// Destroys, off the sync path, the connected UDP sockets pointed at backends that left.
fn destroy_stale_udp(layout: &PinLayout, report: &SyncReport) {
    if report.stale_udp.is_empty() {
        return;
    }
    let (layout, stale) = (layout.clone(), report.stale_udp.clone());
    tokio::task::spawn_blocking(move || match sockets::destroy_stale(&layout, &stale) {
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
    });
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
              "two services claim one frontend; the first by namespace/name is used");
    }
    for f in &report.full {
        error!(service = %f.service, frontend = frontend_string(&f.frontend), map = f.map, capacity = f.capacity,
               "map full: the change is refused and the frontend keeps what it had; raise the capacity");
    }
    for e in &report.errors {
        error!(error = %e, "datapath write failed; retrying in {RETRY_AFTER:?}");
    }
}
